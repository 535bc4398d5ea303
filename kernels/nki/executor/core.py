"""Tiles, buffers, dtypes, limits and counters of the NKI executor (see the package docstring)."""

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
    def _binary(self, other, ufunc, reverse=False):
        from kernels.nki.executor import language

        return language._elementwise(ufunc, (other, self) if reverse else (self, other))

    def __add__(self, o):
        return self._binary(o, np.add)

    def __radd__(self, o):
        return self._binary(o, np.add, True)

    def __sub__(self, o):
        return self._binary(o, np.subtract)

    def __rsub__(self, o):
        return self._binary(o, np.subtract, True)

    def __mul__(self, o):
        return self._binary(o, np.multiply)

    def __rmul__(self, o):
        return self._binary(o, np.multiply, True)

    def __truediv__(self, o):
        return self._binary(o, np.divide)

    def __neg__(self):
        return self._binary(-1.0, np.multiply)

    def __iadd__(self, other):
        # psum[...] += nc_matmul(...): accumulate in place (fp32 in PSUM)
        result = self._binary(other, np.add)
        self.data[...] = cast(result.data, self.dtype)
        return self


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
