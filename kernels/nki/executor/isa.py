"""`neuronxcc.nki.isa` (nisa), the subset our kernels use, executed with NumPy.

Builds on `core` only (language builds on this module, never the reverse).
"""

from __future__ import annotations

import numpy as np

from kernels.nki.executor import core
from kernels.nki.executor.core import HardwareLimitError, Tensor, counters

unknown_engine, tensor_engine, vector_engine, scalar_engine, gpsimd_engine = 0, 1, 2, 3, 4


def _tile(x, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.buffer == "hbm":
        raise HardwareLimitError(f"{what} must be an on-chip tile; got {x!r}")
    core._values(x)  # read-before-write check
    return x


def nc_matmul(stationary, moving, *, is_stationary_onezero=False, is_moving_onezero=False,
              is_transpose=False, mask=None, **kwargs):
    """stationary.T @ moving on the Tensor Engine: SBUF operands, fp32 result in PSUM."""
    if mask is not None:
        raise core.OutsideSubsetError("masked nc_matmul is outside the executor's subset")
    s, m = _tile(stationary, "stationary"), _tile(moving, "moving")
    if s.buffer != "sbuf" or m.buffer != "sbuf":
        raise HardwareLimitError("nc_matmul reads its operands from SBUF; copy PSUM tiles to SBUF first")
    if s.ndim != 2 or m.ndim != 2:
        raise HardwareLimitError(f"nc_matmul takes 2-D tiles; got {s.shape} and {m.shape}")
    (k, mm), (k2, n) = s.shape, m.shape
    if k != k2:
        raise HardwareLimitError(f"nc_matmul contraction (partition) sizes differ: {k} vs {k2}")
    if k > core.PMAX or mm > core.STATIONARY_FMAX or n > core.MOVING_FMAX:
        raise HardwareLimitError(f"nc_matmul stationary {s.shape} / moving {m.shape} exceed the Tensor "
                                 f"Engine: contraction <= {core.PMAX}, stationary free <= "
                                 f"{core.STATIONARY_FMAX}, moving free <= {core.MOVING_FMAX}")
    if s.dtype is not m.dtype:
        raise HardwareLimitError(f"nc_matmul operands have different dtypes: {s.dtype} and {m.dtype}")
    for flag, t, name in ((is_stationary_onezero, s, "stationary"), (is_moving_onezero, m, "moving")):
        if flag and not np.isin(t.data, (0.0, 1.0)).all():
            raise HardwareLimitError(f"is_{name}_onezero=True but the {name} tile holds other values")
    counters.matmul_flops += 2 * k * mm * n
    out = s.data.astype(np.float64).T @ m.data.astype(np.float64)
    return core.mark_matmul_result(Tensor(out.astype(np.float32), core.float32, "psum"))


def nc_transpose(data, *, mask=None, dtype=None, engine=unknown_engine, **kwargs):
    """Partition <-> free transpose: Tensor Engine (SBUF -> PSUM, <= 128x128) or Vector Engine
    (<= 32x32, SBUF or PSUM in, SBUF out)."""
    if mask is not None:
        raise core.OutsideSubsetError("masked nc_transpose is outside the executor's subset")
    t = _tile(data, "nc_transpose data")
    flat = t.data.reshape(t.shape[0], -1)
    small = flat.shape[0] <= 32 and flat.shape[1] <= 32
    use_vector = engine == vector_engine or (engine == unknown_engine and t.buffer == "psum")
    if use_vector and not small:
        raise HardwareLimitError(f"a Vector Engine transpose takes at most 32x32; got {flat.shape}")
    if not use_vector:
        if t.buffer != "sbuf":
            raise HardwareLimitError("a Tensor Engine transpose reads SBUF; copy the PSUM tile first")
        if flat.shape[1] > core.PMAX:
            raise HardwareLimitError(f"a Tensor Engine transpose takes at most 128x128; got {flat.shape}")
        counters.transpose_elems += flat.size
    else:
        counters.vector_elems += flat.size
    out_dtype = dtype or t.dtype
    return Tensor(core.cast(flat.T.copy(), out_dtype), out_dtype, "sbuf" if use_vector else "psum")


def _vector_operand(x, data: Tensor, what: str):
    if isinstance(x, Tensor):
        if x.shape != (data.shape[0], 1):
            raise HardwareLimitError(f"{what} must be a scalar or a ({data.shape[0]}, 1) tile; got {x.shape}")
        return core._values(x).astype(np.float32)
    return np.float32(x)


def _np_op(op):
    fn = getattr(op, "_np", op)
    if not callable(fn):
        raise TypeError(f"not an NKI operator: {op!r}")
    return fn


def tensor_scalar(data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, *,
                  dtype=None, mask=None, engine=unknown_engine, **kwargs):
    """(data op0 operand0) op1 operand1, operands scalars or one value per partition."""
    if mask is not None:
        raise core.OutsideSubsetError("masked tensor_scalar is outside the executor's subset")
    t = _tile(data, "tensor_scalar data")
    v = core._values(t).astype(np.float32)
    a = _vector_operand(operand0, t, "operand0")
    with np.errstate(all="ignore"):
        v = _np_op(op0)(a, v) if reverse0 else _np_op(op0)(v, a)
        if op1 is not None:
            b = _vector_operand(operand1, t, "operand1")
            v = _np_op(op1)(b, v) if reverse1 else _np_op(op1)(v, b)
    counters.vector_elems += v.size
    out_dtype = dtype or t.dtype
    return Tensor(core.cast(v, out_dtype), out_dtype, "sbuf")


def scalar_tensor_tensor(*, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, dtype=None,
                         mask=None, **kwargs):
    """(data op0 operand0) op1 operand1 on the Vector Engine: operand0 a scalar or one value per
    partition, operand1 a tile of data's shape (not both data and operand1 in PSUM)."""
    if mask is not None:
        raise core.OutsideSubsetError("masked scalar_tensor_tensor is outside the executor's subset")
    t, other = _tile(data, "data"), _tile(operand1, "operand1")
    if other.shape != t.shape:
        raise HardwareLimitError(f"operand1 {other.shape} must have data's shape {t.shape}")
    core.check_psum_inputs((t, other), "nisa.scalar_tensor_tensor (data and operand1)")
    a = _vector_operand(operand0, t, "operand0")
    v, w = core._values(t).astype(np.float32), core._values(other).astype(np.float32)
    with np.errstate(all="ignore"):
        v = _np_op(op0)(a, v) if reverse0 else _np_op(op0)(v, a)
        v = _np_op(op1)(w, v) if reverse1 else _np_op(op1)(v, w)
    counters.vector_elems += v.size
    out_dtype = dtype or t.dtype
    return Tensor(core.cast(v, out_dtype), out_dtype, "sbuf")


def activation(op, data, *, bias=None, scale=1.0, mask=None, dtype=None, **kwargs):
    """op(data * scale + bias) on the Scalar Engine; bias and a tile scale hold one value per partition."""
    if mask is not None:
        raise core.OutsideSubsetError("masked activation is outside the executor's subset")
    t = _tile(data, "activation data")
    v = core._values(t).astype(np.float32) * _vector_operand(scale, t, "scale")
    if bias is not None:
        v = v + _vector_operand(bias, t, "bias")
    with np.errstate(all="ignore"):
        v = np.asarray(_np_op(op)(v), dtype=np.float32)
    counters.vector_elems += v.size
    out_dtype = dtype or t.dtype
    return Tensor(core.cast(v, out_dtype), out_dtype, "sbuf")


def affine_select(pred, on_true_tile, on_false_value, *, mask=None, dtype=None, **kwargs):
    """pred ? on_true_tile : on_false_value, pred an affine expression of nl.arange indices."""
    if mask is not None:
        raise core.OutsideSubsetError("masked affine_select is outside the executor's subset")
    if not (isinstance(pred, np.ndarray) and pred.dtype == bool):
        raise TypeError("affine_select's pred is an affine expression of nl.arange indices (for example "
                        "i_p >= i_f); for a data-dependent choice use nl.where")
    t = _tile(on_true_tile, "on_true_tile")
    if np.broadcast_shapes(pred.shape, t.shape) != t.shape:
        raise HardwareLimitError(f"affine_select pred {pred.shape} does not match the tile {t.shape}")
    v = np.where(pred, core._values(t), np.float32(on_false_value))
    counters.vector_elems += v.size
    out_dtype = dtype or t.dtype
    return Tensor(core.cast(v, out_dtype), out_dtype, "sbuf")


def iota(expr, dtype, *, mask=None, **kwargs):
    """A constant tile from an affine expression of nl.arange indices."""
    values = np.asarray(expr)
    if values.ndim == 1:
        values = values[:, None]
    return Tensor(core.cast(values, dtype), dtype, "sbuf")


def tensor_tensor(data1, data2, op, *, dtype=None, mask=None, engine=unknown_engine, **kwargs):
    """data1 op data2 element-wise on the Vector Engine: same partition size and elements per
    partition; data1 and data2 cannot both be in PSUM (see core.check_psum_inputs)."""
    a, b = _tile(data1, "tensor_tensor data1"), _tile(data2, "tensor_tensor data2")
    if a.shape[0] != b.shape[0] or a.data.size != b.data.size:
        raise HardwareLimitError(f"tensor_tensor tiles {a.shape} and {b.shape} differ in partitions or "
                                 "elements per partition")
    fn = _np_op(op)
    return core.elementwise(lambda x, y: fn(x, y.reshape(x.shape)), (a, b), dtype, mask,
                            name=f"nisa.tensor_tensor({getattr(op, '__name__', op)})")


def tensor_reduce(op, data, axis, *, mask=None, dtype=None, negate=False, keepdims=False, **kwargs):
    fn = {np.add: np.sum, np.maximum: np.max}.get(_np_op(op))
    if fn is None:
        raise core.OutsideSubsetError(f"tensor_reduce with {op!r} is outside the executor's subset")
    out = core.reduce(fn, data, axis, dtype, mask, keepdims, name="nisa.tensor_reduce")
    return core.elementwise(np.negative, (out,), name="nisa.tensor_reduce") if negate else out


def tensor_copy(src, *, mask=None, dtype=None, engine=unknown_engine, **kwargs):
    return core.elementwise(lambda v: v, (src,), dtype, mask, name="nisa.tensor_copy")
