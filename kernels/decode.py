"""Compiled CPU kernels for one-token decoding (csrc/decode_cpu.c), float32.

Decoding one token is a chain of small operations on a few rows, so on a CPU its time goes to
streaming each weight matrix once and to per-operation overhead. The kernels: a matrix-vector
product for linear layers (rows split over worker threads), a fused Mamba-2 step (conv window,
SSM state update, gate and grouped RMSNorm in one call), a fused residual add + RMSNorm, and
whole pre-norm Mamba-2 and Mamba-1 blocks (add + norm, projections, step) in one call each.
kernels.dispatch chooses them for float32 CPU tensors without autograd; the torch compositions
there are the reference they are tested against.
"""

from __future__ import annotations

import ctypes
import math

import torch

from kernels import cbuild
from kernels.cbuild import ptr

DECODE_MAX_ROWS = 4  # above this, BLAS's matrix-matrix product is as fast or faster (BENCHMARKS.md)
_NAME = "decode_cpu"
_F32_MAX = 3.4028234663852886e38


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.gemv.argtypes = [p] * 4 + [i64] * 3
    lib.decode_set_threads.argtypes = [i64]
    lib.decode_set_threads.restype = i64
    lib.mamba2_step.argtypes = [p] * 8 + [i64, p, i64, f32, f32, f32, p] + [i64] * 7
    lib.add_rms_norm.argtypes = [p] * 5 + [i64, i64, f32]
    lib.mamba2_block_step.argtypes = ([p] * 4 + [f32] + [p] * 11 + [i64, p, i64, f32, f32, f32]
                                      + [p] * 4 + [i64] * 7)
    lib.mamba1_block_step.argtypes = [p] * 4 + [f32] + [p] * 20 + [i64] * 6
    for fn in (lib.gemv, lib.mamba2_step, lib.add_rms_norm, lib.mamba2_block_step, lib.mamba1_block_step):
        fn.restype = None
    lib.decode_set_threads(torch.get_num_threads())


def _lib():
    return cbuild.load(_NAME, _declare)


def available() -> bool:
    return _lib() is not None


def eligible(*tensors: torch.Tensor | None) -> bool:
    """float32 CPU tensors, no gradient wanted, and the C library builds here."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias, reading the weight once for all rows of x."""
    rows, cols = weight.shape
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {cols}")
    xs = x.reshape(-1, cols).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = x.new_empty(xs.shape[0], rows)
    _lib().gemv(ptr(w), ptr(xs), ptr(b), ptr(y), xs.shape[0], rows, cols)
    return y.view(*x.shape[:-1], rows)


def _step_args(conv_weight, conv_bias, A, dt_bias, D, norm_weight):
    """Contiguous versions (usually the tensors themselves): the caller keeps them referenced."""
    tensors = (conv_weight, conv_bias, A, dt_bias, D, norm_weight)
    return [None if t is None else t.contiguous() for t in tensors]


def mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D, norm_weight,
                norm_eps: float, norm_before_gate: bool, ngroups: int, dt_limit=(0.0, math.inf)):
    """See kernels.dispatch.mamba2_step; conv_state / ssm_state must be contiguous float32."""
    batch = zxbcdt.shape[0]
    _, nheads, headdim, dstate = ssm_state.shape
    width = conv_state.shape[-1]
    if not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
        raise ValueError("conv_state and ssm_state must be contiguous for the C decode step")
    d_inner = nheads * headdim
    zxbcdt = zxbcdt.contiguous()
    conv_weight, conv_bias, A, dt_bias, D, norm_weight = _step_args(conv_weight, conv_bias, A, dt_bias,
                                                                    D, norm_weight)
    y = zxbcdt.new_empty(batch, d_inner)
    args = (ptr(zxbcdt), ptr(conv_state), ptr(conv_weight), ptr(conv_bias), ptr(ssm_state), ptr(A),
            ptr(dt_bias), ptr(D), int(D.numel() == d_inner), ptr(norm_weight), int(norm_before_gate),
            float(norm_eps), float(dt_limit[0]), min(float(dt_limit[1]), _F32_MAX), ptr(y),
            nheads, headdim, dstate, ngroups, width)
    lib = _lib()
    cbuild.parallel(lambda b0, b1: lib.mamba2_step(*args, b0, b1), cbuild.split(batch))
    return y


def add_rms_norm(hidden, residual, weight, eps: float):
    """(rmsnorm(hidden + residual) * weight, hidden + residual); residual None means zeros."""
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim).contiguous()
    r = None if residual is None else residual.reshape(-1, dim).contiguous()
    weight = weight.contiguous()
    out_res = torch.empty_like(h)
    normed = torch.empty_like(h)
    _lib().add_rms_norm(ptr(h), ptr(r), ptr(weight), ptr(out_res), ptr(normed),
                        h.shape[0], dim, float(eps))
    return normed.view_as(hidden), out_res.view_as(hidden)


def mamba2_block_step(hidden, residual, norm_weight, norm_eps, in_weight, in_bias, conv_state, ssm_state,
                      conv_weight, conv_bias, A, dt_bias, D, gate_norm_weight, gate_eps,
                      norm_before_gate, ngroups, dt_limit, out_weight, out_bias):
    """See kernels.dispatch.mamba2_block_step; one C call (its two products on the worker threads)."""
    d_model = hidden.shape[-1]
    _, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    if not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
        raise ValueError("conv_state and ssm_state must be contiguous for the C decode step")
    h = hidden.reshape(-1, d_model).contiguous()
    r = None if residual is None else residual.reshape(-1, d_model).contiguous()
    batch = h.shape[0]
    norm_weight, in_weight, out_weight = (t.contiguous() for t in (norm_weight, in_weight, out_weight))
    in_bias = None if in_bias is None else in_bias.contiguous()
    out_bias = None if out_bias is None else out_bias.contiguous()
    conv_weight, conv_bias, A, dt_bias, D, gate_norm_weight = _step_args(conv_weight, conv_bias, A, dt_bias,
                                                                         D, gate_norm_weight)
    res_out, u = torch.empty_like(h), torch.empty_like(h)
    zxbcdt = h.new_empty(batch, in_weight.shape[0])
    y, out = h.new_empty(batch, d_inner), torch.empty_like(h)
    _lib().mamba2_block_step(
        ptr(h), ptr(r), ptr(res_out), ptr(norm_weight), float(norm_eps), ptr(u), ptr(in_weight),
        ptr(in_bias), ptr(zxbcdt), ptr(conv_state), ptr(conv_weight), ptr(conv_bias), ptr(ssm_state),
        ptr(A), ptr(dt_bias), ptr(D), int(D.numel() == d_inner), ptr(gate_norm_weight),
        int(norm_before_gate), float(gate_eps), float(dt_limit[0]), min(float(dt_limit[1]), _F32_MAX),
        ptr(y), ptr(out_weight), ptr(out_bias), ptr(out), batch, d_model, nheads, headdim, dstate,
        ngroups, conv_state.shape[-1])
    return out.view_as(hidden), res_out.view_as(hidden)


def mamba1_block_step(hidden, residual, norm_weight, norm_eps, in_weight, in_bias, conv_state, ssm_state,
                      conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight,
                      out_bias):
    """See kernels.dispatch.mamba1_block_step; one C call (its products on the worker threads)."""
    d_model = hidden.shape[-1]
    _, d_inner, dstate = ssm_state.shape
    dt_rank = dt_proj_weight.shape[1]
    if not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
        raise ValueError("conv_state and ssm_state must be contiguous for the C decode step")
    h = hidden.reshape(-1, d_model).contiguous()
    r = None if residual is None else residual.reshape(-1, d_model).contiguous()
    batch = h.shape[0]
    norm_weight, in_weight, conv_weight, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight = (
        t.contiguous() for t in (norm_weight, in_weight, conv_weight, x_proj_weight, dt_proj_weight,
                                 dt_bias, A, D, out_weight))
    in_bias, conv_bias, out_bias = (None if t is None else t.contiguous()
                                    for t in (in_bias, conv_bias, out_bias))
    res_out, u, out = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
    xz = h.new_empty(batch, 2 * d_inner)
    xc, dt, y = (h.new_empty(batch, d_inner) for _ in range(3))
    x_dbl = h.new_empty(batch, dt_rank + 2 * dstate)
    _lib().mamba1_block_step(
        ptr(h), ptr(r), ptr(res_out), ptr(norm_weight), float(norm_eps), ptr(u), ptr(in_weight), ptr(in_bias),
        ptr(xz), ptr(conv_state), ptr(conv_weight), ptr(conv_bias), ptr(xc), ptr(x_proj_weight), ptr(x_dbl),
        ptr(dt_proj_weight), ptr(dt), ptr(dt_bias), ptr(A), ptr(D), ptr(ssm_state), ptr(y), ptr(out_weight),
        ptr(out_bias), ptr(out), batch, d_model, d_inner, dt_rank, dstate, conv_state.shape[-1])
    return out.view_as(hidden), res_out.view_as(hidden)
