"""`neuronxcc.nki.language` (nl), the subset our kernels use, executed with NumPy.

Names and signatures follow the public NKI API reference; behaviour beyond what is documented
there (and needed by kernels/nki) raises instead of guessing. Builds on `core` and `isa`. An op on
two or more tiles (nl.add, nl.equal, nl.where, a + b, ...) is a tensor-tensor instruction: at most
one input tile in PSUM (core.check_psum_inputs).
"""

from __future__ import annotations

import numpy as np

from kernels.nki.executor import core, isa
from kernels.nki.executor.core import (  # noqa: F401  (re-exported as nl.*)
    DynSlice,
    HardwareLimitError,
    HbmView,
    Tensor,
    bfloat16,
    bool_,
    counters,
    float16,
    float32,
    int32,
    new_tile,
    uint8,
)

# memory buffers
sbuf, psum, hbm, private_hbm, shared_hbm = "sbuf", "psum", "hbm", "private_hbm", "shared_hbm"


class tile_size:  # noqa: N801 (public name)
    pmax = core.PMAX
    psum_fmax = core.PSUM_FMAX
    gemm_stationary_fmax = core.STATIONARY_FMAX
    gemm_moving_fmax = core.MOVING_FMAX


# --- the SPMD launch state, set by the executor's jit for each program instance ----------------
class _Launch:
    grid: tuple = ()
    ids: tuple = ()
    shared: list = []  # shared_hbm tensors, in allocation order (the same for every program)
    n_shared: int = 0


launch = _Launch()


def program_id(axis):
    if axis >= len(launch.ids):
        raise ValueError(f"program_id({axis}) on a launch grid of {len(launch.grid)} dimension(s)")
    return launch.ids[axis]


def num_programs(axes=None):
    if axes is None:
        return int(np.prod(launch.grid)) if launch.grid else 1
    return launch.grid[axes]


def program_ndim():
    return len(launch.grid)


# --- creation --------------------------------------------------------------------------------
def ndarray(shape, dtype, *, buffer=None, name="", **kwargs):
    buffer = buffer or sbuf
    if buffer in (hbm, private_hbm, shared_hbm):
        if buffer == shared_hbm and launch.grid:
            if launch.n_shared < len(launch.shared):  # a later program: the same tensor
                tensor = launch.shared[launch.n_shared]
                launch.n_shared += 1
                return tensor
        data = np.full(tuple(shape), np.nan if dtype in (float32, bfloat16, float16) else 0, dtype.np)
        tensor = Tensor(data, dtype, "hbm")
        if buffer == shared_hbm and launch.grid:
            launch.shared.append(tensor)
            launch.n_shared += 1
        return tensor
    return new_tile(shape, dtype, buffer)


def zeros(shape, dtype, *, buffer=None, name="", **kwargs):
    return full(shape, 0, dtype, buffer=buffer)


def ones(shape, dtype, *, buffer=None, name="", **kwargs):
    return full(shape, 1, dtype, buffer=buffer)


def full(shape, fill_value, dtype, *, buffer=None, name="", **kwargs):
    if buffer in (hbm, private_hbm, shared_hbm):
        raise HardwareLimitError("nl.full/zeros/ones make on-chip tiles; allocate HBM with nl.ndarray")
    return new_tile(shape, dtype, buffer or sbuf, fill=fill_value)


def par_dim(size):
    return size


# --- indexing and iteration -------------------------------------------------------------------
def arange(*args):
    return np.arange(*args)


def ds(start, size):
    return DynSlice(start, size)


def affine_range(*args, **kwargs):
    """Parallel iterations: run here in reverse order, so a loop-carried dependency (which
    affine_range forbids) changes the result and a test catches it."""
    return reversed(range(*args))


def sequential_range(*args, **kwargs):
    return range(*args)


def static_range(*args, **kwargs):
    return range(*args)


# --- HBM <-> SBUF -----------------------------------------------------------------------------
def _hbm_operand(x) -> HbmView:
    if isinstance(x, Tensor) and x.buffer == "hbm":
        return x[...]
    if isinstance(x, HbmView):
        return x
    raise HardwareLimitError(f"nl.load/nl.store move data between HBM and SBUF; got {x!r}")


def load(src, *, mask=None, dtype=None, **kwargs):
    if mask is not None:
        raise core.OutsideSubsetError("masked nl.load is outside the executor's subset")
    view = _hbm_operand(src)
    values = np.array(view.tensor.data[view.key])
    if values.ndim < 2:
        raise HardwareLimitError(f"nl.load of an HBM slice of shape {values.shape}: index so that the tile "
                                 "has a partition axis and a free axis (use a:a+1 for a single row)")
    counters.dma_bytes += values.size * view.tensor.dtype.itemsize
    out_dtype = dtype or view.tensor.dtype
    return Tensor(core.cast(values, out_dtype), out_dtype, "sbuf")


def store(dst, value, *, mask=None, **kwargs):
    if mask is not None:
        raise core.OutsideSubsetError("masked nl.store is outside the executor's subset")
    view = _hbm_operand(dst)
    if not isinstance(value, Tensor) or value.buffer != "sbuf":
        raise HardwareLimitError(f"nl.store writes an SBUF tile to HBM; got {value!r} "
                                 "(copy a PSUM tile to SBUF first)")
    values = core._values(value)
    target_shape = view.tensor.data[view.key].shape
    if values.shape != target_shape:
        raise HardwareLimitError(f"nl.store of a {values.shape} tile into an HBM slice of {target_shape}")
    view.tensor.data[view.key] = core.cast(values, view.tensor.dtype)
    counters.dma_bytes += values.size * view.tensor.dtype.itemsize


# --- element-wise math ------------------------------------------------------------------------
def _binary(ufunc, name):
    def op(x, y, *, dtype=None, mask=None, **kwargs):
        return core.elementwise(ufunc, (x, y), dtype, mask, name=f"nl.{name}")

    op.__name__, op._np = name, ufunc
    return op


def _unary(fn, name):
    def op(x, *, dtype=None, mask=None, **kwargs):
        return core.elementwise(fn, (x,), dtype, mask, name=f"nl.{name}")

    op.__name__, op._np = name, fn
    return op


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


add = _binary(np.add, "add")
subtract = _binary(np.subtract, "subtract")
multiply = _binary(np.multiply, "multiply")
divide = _binary(np.divide, "divide")
maximum = _binary(np.maximum, "maximum")
minimum = _binary(np.minimum, "minimum")
equal = _binary(np.equal, "equal")
not_equal = _binary(np.not_equal, "not_equal")
greater_equal = _binary(np.greater_equal, "greater_equal")
less = _binary(np.less, "less")
exp = _unary(np.exp, "exp")
log = _unary(np.log, "log")
sigmoid = _unary(_sigmoid, "sigmoid")
silu = _unary(lambda x: x * _sigmoid(x), "silu")
softplus = _unary(lambda x: np.logaddexp(0.0, x), "softplus")
square = _unary(np.square, "square")
rsqrt = _unary(lambda v: 1.0 / np.sqrt(v), "rsqrt")
negative = _unary(np.negative, "negative")


def copy(src, *, mask=None, dtype=None, **kwargs):
    return core.elementwise(lambda v: v, (src,), dtype, mask, name="nl.copy")


copy._np = lambda v: v


def where(condition, x, y, *, dtype=None, mask=None, **kwargs):
    return core.elementwise(lambda c, a, b: np.where(c != 0, a, b), (condition, x, y), dtype, mask,
                            name="nl.where")


def sum(x, axis, *, dtype=None, mask=None, keepdims=False, **kwargs):  # noqa: A001 (public name)
    return core.reduce(np.sum, x, axis, dtype, mask, keepdims, name="nl.sum")


def max(x, axis, *, dtype=None, mask=None, keepdims=False, **kwargs):  # noqa: A001 (public name)
    return core.reduce(np.max, x, axis, dtype, mask, keepdims, name="nl.max")


# --- Tensor-engine helpers --------------------------------------------------------------------
def matmul(x, y, *, transpose_x=False, mask=None, **kwargs):
    """x @ y; with transpose_x, x is given as x.T ([K, M], the contraction on partitions)."""
    stationary = x if transpose_x else copy(isa.nc_transpose(x))
    return isa.nc_matmul(stationary, y, mask=mask)


def transpose(x, *, dtype=None, mask=None, **kwargs):
    return isa.nc_transpose(x, dtype=dtype, mask=mask)
