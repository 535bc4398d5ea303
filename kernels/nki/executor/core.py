"""The executor's primitives: tiles, buffers, dtypes, limits, counters and the element-wise engine
that every Vector / Scalar Engine op runs through (see the package docstring).

This module imports nothing else of the executor; `isa` builds on it, `language` on both
(core <- isa <- language), so the modules import in any order and have no cycle.
"""

from __future__ import annotations

import weakref

import numpy as np

PMAX = 128  # partitions of SBUF / PSUM
SBUF_PARTITION_BYTES = 192 * 1024  # trn1: 24 MiB of SBUF over 128 partitions
PSUM_FMAX = 512  # fp32 elements per partition in one PSUM bank (one matmul result)
PSUM_PARTITION_BYTES = 8 * PSUM_FMAX * 4  # 8 banks of 2 KiB
STATIONARY_FMAX = 128
MOVING_FMAX = 512


class HardwareLimitError(ValueError):
    """A kernel asked for something a NeuronCore cannot do (tile too large, wrong buffer, ...)."""


class OutsideSubsetError(TypeError):
    """A call this executor deliberately does not model (e.g. the `mask=` argument, which our kernels
    never pass): refused loudly rather than executed with guessed semantics."""


class ReadBeforeWriteError(RuntimeError):
    """A kernel read an on-chip element it never wrote (fresh buffers hold NaN)."""


class DType:
    def __init__(self, name: str, itemsize: int, np_dtype):
        self.name, self.itemsize, self.np = name, itemsize, np.dtype(np_dtype)

    def __repr__(self):
        return self.name


float32 = DType("float32", 4, np.float32)
bfloat16 = DType("bfloat16", 2, np.float32)  # stored as float32 values rounded to bf16
float16 = DType("float16", 2, np.float16)
int32 = DType("int32", 4, np.int32)
uint8 = DType("uint8", 1, np.uint8)
bool_ = DType("bool_", 1, np.bool_)
_FLOATS = (float32, bfloat16, float16)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); returns float32."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(a), np.float32(np.nan), rounded.view(np.float32)).astype(np.float32)


def cast(values, dtype: DType) -> np.ndarray:
    """Values as stored in a tile of `dtype` (bf16 rounding emulated)."""
    out = np.asarray(values).astype(dtype.np)
    return round_bf16(out) if dtype is bfloat16 else out


def promote(*dtypes: DType) -> DType:
    """NKI type promotion, reduced to what our kernels meet: the widest float wins."""
    floats = [d for d in dtypes if d in _FLOATS]
    if float32 in floats or (bfloat16 in floats and float16 in floats):
        return float32
    if floats:
        return floats[0]
    return dtypes[0] if dtypes else float32


class Counters:
    """Work done since the last reset: what a trn1 user can compare against a profile."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.matmul_flops = 0  # 2*K*M*N per nc_matmul (transposes counted separately)
        self.transpose_elems = 0
        self.vector_elems = 0  # element-wise / reduction work on the vector, scalar, gpsimd engines
        self.dma_bytes = 0  # HBM <-> SBUF

    def as_dict(self) -> dict:
        return dict(vars(self))


counters = Counters()


class _Budget:
    """Bytes per partition held by live on-chip tiles of the current launch. A tile lives while
    Python references it, which is never shorter than the compiler's liveness: if the executor
    says it fits, the allocation fits (up to the compiler's own alignment and spills)."""

    generation = 0
    live = {"sbuf": 0, "psum": 0}
    limit = {"sbuf": SBUF_PARTITION_BYTES, "psum": PSUM_PARTITION_BYTES}

    @classmethod
    def new_launch(cls):
        cls.generation += 1
        cls.live = {"sbuf": 0, "psum": 0}

    @classmethod
    def claim(cls, tensor, buffer: str, nbytes: int):
        if cls.live[buffer] + nbytes > cls.limit[buffer]:
            raise HardwareLimitError(f"{buffer.upper()} overflow: live tiles would hold "
                                     f"{cls.live[buffer] + nbytes} bytes per partition; "
                                     f"the partition has {cls.limit[buffer]}")
        cls.live[buffer] += nbytes
        weakref.finalize(tensor, cls.release, cls.generation, buffer, nbytes)

    @classmethod
    def release(cls, generation: int, buffer: str, nbytes: int):
        if generation == cls.generation:
            cls.live[buffer] -= nbytes


def _check_tile_shape(shape, buffer: str, dtype: DType):
    if len(shape) == 0:
        return
    if shape[0] > PMAX:
        raise HardwareLimitError(f"a {buffer} tile of shape {tuple(shape)} has {shape[0]} partitions; "
                                 f"the partition axis (first) holds at most {PMAX}")
    per_partition = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if buffer == "sbuf" and per_partition > SBUF_PARTITION_BYTES:
        raise HardwareLimitError(f"an SBUF tile of shape {tuple(shape)} needs {per_partition} bytes per "
                                 f"partition; at most {SBUF_PARTITION_BYTES}")
    if buffer == "psum" and per_partition > PSUM_FMAX * 4:
        raise HardwareLimitError(f"a PSUM tile of shape {tuple(shape)} needs {per_partition} bytes per "
                                 f"partition; one PSUM bank holds {PSUM_FMAX * 4}")


def _norm_key(key):
    """nl.ds / slices / ints / arange arrays -> a numpy index."""
    if not isinstance(key, tuple):
        key = (key,)
    return tuple(k.as_slice() if isinstance(k, DynSlice) else k for k in key)


class DynSlice:
    """nl.ds(start, size)."""

    def __init__(self, start, size):
        self.start, self.size = int(start), int(size)

    def as_slice(self):
        return slice(self.start, self.start + self.size)


class Tensor:
    """An array in HBM, SBUF or PSUM. On-chip tiles track which elements were ever written."""

    def __init__(self, data: np.ndarray, dtype: DType, buffer: str, written: np.ndarray | None = None):
        if buffer != "hbm":
            _check_tile_shape(data.shape, buffer, dtype)
            _Budget.claim(self, buffer, int(np.prod(data.shape[1:], dtype=np.int64)) * dtype.itemsize)
        self.data, self.dtype, self.buffer = data, dtype, buffer
        self.written = written if buffer != "hbm" else None
        if self.written is None and buffer != "hbm":
            self.written = np.ones(data.shape, dtype=bool)

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    def __repr__(self):
        return f"Tensor({self.buffer}, {self.dtype}, {self.shape})"

    # --- indexing -------------------------------------------------------------------------
    def __getitem__(self, key):
        key = _norm_key(key)
        if self.buffer == "hbm":
            return HbmView(self, key)
        seen = self.written[key]
        if not seen.all():
            raise ReadBeforeWriteError(f"read of {int((~seen).sum())} unwritten element(s) of {self!r} "
                                       f"at {key}")
        return Tensor(np.array(self.data[key]), self.dtype, "sbuf" if self.buffer == "sbuf" else "psum")

    def __setitem__(self, key, value):
        if self.buffer == "hbm":
            raise HardwareLimitError("an HBM tensor is written with nl.store, not by assignment")
        key = _norm_key(key)
        values = _values(value)
        target = self.data[key]
        if isinstance(value, Tensor) and np.shape(values) != np.shape(target):
            raise HardwareLimitError(f"cannot write a tile of shape {np.shape(values)} into "
                                     f"{np.shape(target)} of {self!r}")
        self.data[key] = cast(values, self.dtype)
        self.written[key] = True

    # --- arithmetic on tiles (NKI allows +, -, *, / and unary minus) ----------------------------
    def _binary(self, other, ufunc, name, reverse=False):
        return elementwise(ufunc, (other, self) if reverse else (self, other), name=f"tile {name}")

    def __add__(self, o):
        return self._binary(o, np.add, "+")

    def __radd__(self, o):
        return self._binary(o, np.add, "+", True)

    def __sub__(self, o):
        return self._binary(o, np.subtract, "-")

    def __rsub__(self, o):
        return self._binary(o, np.subtract, "-", True)

    def __mul__(self, o):
        return self._binary(o, np.multiply, "*")

    def __rmul__(self, o):
        return self._binary(o, np.multiply, "*", True)

    def __truediv__(self, o):
        return self._binary(o, np.divide, "/")

    def __neg__(self):
        return self._binary(-1.0, np.multiply, "unary -")

    def __iadd__(self, other):
        if self.buffer == "psum" and is_fresh_matmul_result(other):
            # psum[...] += nc_matmul(...): the Tensor Engine accumulates into its PSUM bank (the
            # documented way to contract over more than 128 partitions); no Vector Engine read
            if other.shape != self.shape:
                raise HardwareLimitError(f"cannot accumulate a {other.shape} matmul result into {self!r}")
            _values(self)
            self.data[...] = (self.data.astype(np.float64) + other.data).astype(np.float32)
            return self
        result = self._binary(other, np.add, "+=")
        self.data[...] = cast(result.data, self.dtype)
        return self


_last_matmul = {"result": None}


def mark_matmul_result(tensor: Tensor) -> Tensor:
    """Record the latest nc_matmul result: `psum += <it>` is the matmul accumulating into PSUM."""
    _last_matmul["result"] = weakref.ref(tensor)
    return tensor


def is_fresh_matmul_result(tensor) -> bool:
    """`tensor` is the result of the latest nc_matmul (as in `psum += nc_matmul(...)`); an older
    PSUM tile added to another is a Vector Engine add of two PSUM inputs instead."""
    ref = _last_matmul["result"]
    return ref is not None and ref() is tensor


class HbmView:
    """A lazily indexed HBM tensor: the operand of nl.load / nl.store."""

    def __init__(self, tensor: Tensor, key):
        self.tensor, self.key = tensor, key

    @property
    def shape(self):
        return self.tensor.data[self.key].shape

    @property
    def dtype(self):
        return self.tensor.dtype

    def __getitem__(self, key):
        raise TypeError("index an HBM tensor once (x[a, b:c, ...]), then nl.load it")


def _values(x):
    """The numbers of a tile operand or a Python scalar; HBM operands are refused."""
    if isinstance(x, (HbmView,)) or (isinstance(x, Tensor) and x.buffer == "hbm"):
        raise HardwareLimitError("compute engines read SBUF/PSUM only: nl.load the HBM tensor first")
    if isinstance(x, Tensor):
        if not x.written.all():
            raise ReadBeforeWriteError(f"read of {int((~x.written).sum())} unwritten element(s) of {x!r}")
        return x.data
    if isinstance(x, np.ndarray) and x.dtype == bool:
        return x  # an affine predicate
    if isinstance(x, (int, float, np.floating, np.integer, bool)):
        return x
    raise TypeError(f"not an NKI tile or scalar: {type(x).__name__}")


def new_tile(shape, dtype: DType, buffer: str, fill=None) -> Tensor:
    """A fresh on-chip buffer: NaN (or 0 for integers) and unwritten unless `fill` is given."""
    shape = tuple(int(s) for s in shape)
    if fill is None:
        data = np.full(shape, np.nan if dtype in _FLOATS else 0, dtype=dtype.np)
        return Tensor(data, dtype, buffer, np.zeros(shape, dtype=bool))
    return Tensor(cast(np.full(shape, fill), dtype), dtype, buffer)


# --- the element-wise engine ----------------------------------------------------------------
# NKI ISA, nki.isa.tensor_tensor: "the two input tiles, data1 and data2 cannot both reside in PSUM"
# (legal: both in SBUF, or one in SBUF and one in PSUM); nki.isa.scalar_tensor_tensor says the same
# of data and operand1. https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/api/generated/
# nki.isa.tensor_tensor.html. An nl.* op on two tiles (nl.add, nl.equal, ...) is such an
# instruction; whether the compiler would copy one operand out of PSUM for it is not documented,
# so the executor refuses it, as it refuses the nisa call.
def check_psum_inputs(operands, name: str) -> None:
    """At most one input tile of a tensor-tensor instruction may live in PSUM."""
    in_psum = [o for o in operands if isinstance(o, Tensor) and o.buffer == "psum"]
    if len(in_psum) > 1:
        shapes = ", ".join(str(o.shape) for o in in_psum)
        raise HardwareLimitError(
            f"{name}: {len(in_psum)} input tiles in PSUM ({shapes}); a Vector Engine tensor-tensor "
            f"instruction reads at most one input from PSUM (NKI ISA, nki.isa.tensor_tensor). "
            f"nl.copy one of them to SBUF first")


def elementwise(fn, operands, dtype: DType | None = None, mask=None, name: str = "element-wise op",
                tensor_tensor: bool = True) -> Tensor:
    """fn over the operands' values in fp32 on the Vector / Scalar Engine; the result is an SBUF
    tile of `dtype` (default: the promoted dtype of the tile operands). tensor_tensor: the op
    reads several tiles in one instruction, so at most one of them may be in PSUM."""
    if mask is not None:
        raise OutsideSubsetError(f"masked {name} is outside the executor's subset")
    if tensor_tensor:
        check_psum_inputs(operands, name)
    values = [_values(o) for o in operands]
    tiles = [o for o in operands if isinstance(o, Tensor)]
    if not tiles:
        raise TypeError(f"{name} needs at least one tile operand")
    out_dtype = dtype or promote(*[t.dtype for t in tiles])
    with np.errstate(all="ignore"):
        result = fn(*[np.asarray(v, dtype=np.float32) if not isinstance(v, bool) else v for v in values])
    result = np.asarray(result)
    counters.vector_elems += result.size
    return Tensor(cast(result, out_dtype), out_dtype, "sbuf")


def reduce(fn, x, axis, dtype: DType | None = None, mask=None, keepdims: bool = False,
           name: str = "reduction") -> Tensor:
    """fn (np.sum, np.max) along free axes of one tile."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if 0 in axes:
        raise HardwareLimitError("reductions run along free axes; reduce partitions with a matmul by ones")
    return elementwise(lambda v: fn(v, axis=axes, keepdims=keepdims), (x,), dtype, mask, name)
