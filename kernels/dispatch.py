"""The single place that chooses an implementation for each op."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from kernels import decode
from kernels import triton as triton_kernels  # imports neither triton nor a GPU driver
from kernels.conv1d import (
    causal_conv1d_torch,
    causal_conv1d_update_torch,
    check_conv_args,
    check_update_args,
)
from kernels.nki import nki_available
from kernels.norm import rms_norm
from kernels.norm import rms_norm_gated as _rms_norm_gated_torch
from kernels.selective_scan import check_scan_args, mamba_inner_torch, selective_scan_torch
from kernels.ssd import (
    check_ssd_args,
    mamba_chunk_scan_combined_torch,
    mamba_split_conv1d_scan_combined_torch,
)
from kernels.step import check_state_update_args, selective_state_update_torch


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


_HAS_MAMBA_SSM = _has("mamba_ssm")
_HAS_CAUSAL_CONV1D = _has("causal_conv1d")
_HAS_TRITON = triton_kernels.available()


# Fast backends per device type, in order of preference, and the ops each one provides.
# A new backend (e.g. our Triton kernels) is one entry here plus one branch in each op below.
_CUDA_BACKENDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("cuda-ext", frozenset(
        (["conv1d", "conv1d_update"] if _HAS_CAUSAL_CONV1D else [])
        + (["ssd", "scan", "state_update"] if _HAS_MAMBA_SSM else [])
        + (["inner", "split_scan"] if _HAS_MAMBA_SSM and _HAS_CAUSAL_CONV1D else []))),
    ("triton", frozenset(["ssd", "scan", "conv1d"] if _HAS_TRITON else [])),
)
_FORCEABLE = ("torch", "triton", "cuda-ext", "nki", "chunked")
_BACKENDS_BY_DEVICE = {"cuda": _CUDA_BACKENDS}
# The chunked torch scan (kernels/selective_scan_chunked.py): a graph of fixed size for XLA's
# compiler, where the step loop unrolls once per position. Elsewhere only when MAMBA_KERNELS=chunked.
_CHUNKED = ("chunked", frozenset({"scan"}))


@functools.cache
def _xla_backends() -> tuple[tuple[str, frozenset[str]], ...]:
    """NKI on XLA devices when the real Neuron compiler imports (checked once, on first use)."""
    return (("nki", frozenset({"ssd", "conv1d", "norm_gated"})),) if nki_available() else ()


def backends_for(op: str, device: torch.device) -> list[str]:
    """The backends for this device type that provide op, in order of preference ('cuda-ext' =
    mamba_ssm / causal_conv1d, 'triton' = kernels/triton, 'chunked' = the Mamba-1 chunked scan on
    XLA), then 'torch'. Each op uses the first that handles its call exactly.
    MAMBA_KERNELS=torch|triton|cuda-ext|nki|chunked keeps only that one (and torch, for the calls it
    does not handle)."""
    forced = os.environ.get("MAMBA_KERNELS") or None
    if forced is not None and forced not in _FORCEABLE:
        raise ValueError(f"MAMBA_KERNELS={forced!r} is not a backend; use one of {', '.join(_FORCEABLE)} "
                         "or leave it unset")
    if forced == "torch":
        return ["torch"]
    backends = _xla_backends() if device.type == "xla" else _BACKENDS_BY_DEVICE.get(device.type, ())
    if device.type == "xla" or forced == "chunked":
        backends = (*backends, _CHUNKED)
    names = [name for name, ops in backends if op in ops and forced in (None, name)]
    return names + ["torch"]


def backend_for(op: str, device: torch.device) -> str:
    """The preferred backend for op on this device (see backends_for)."""
    return backends_for(op, device)[0]


def document_index(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """seq_idx renumbered 0, 1, 2, ... by change of value along each row, in int32: a new document
    starts wherever the value changes (as the float64 references read it), also when a value comes
    back ([0,0,1,1,0] is three documents) or is too large for int32 (the C and GPU kernels' type)."""
    if seq_idx is None or seq_idx.shape[-1] == 0:
        return seq_idx
    change = (seq_idx[..., 1:] != seq_idx[..., :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(change[..., :1]), change.cumsum(-1, dtype=torch.int32)], -1)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), return_final_states=False,
                              return_varlen_states=False):
    """Mamba-2 SSD scan. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], D [h] or [h,p], z like x,
    dt_bias [h], initial_states [b,h,p,n], seq_idx [b,l] int; cu_seqlens [num_seqs+1] (batch 1).
    Returns y, then final_states [b,h,p,n], then varlen_states [num_seqs,h,p,n], as requested."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the sequence boundaries)")
    seq_idx = document_index(seq_idx)
    if (backend_for("ssd", x.device) == "nki" and initial_states is None and cu_seqlens is None
            and not return_final_states and not return_varlen_states):
        from kernels.nki.autograd import mamba_chunk_scan_combined_nki  # length % 128: ValueError

        return mamba_chunk_scan_combined_nki(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                             seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit)
    backends = backends_for("ssd", x.device)
    # mamba_ssm reads cu_seqlens only for varlen states; without seq_idx we give ours (no leaks).
    if "cuda-ext" in backends and (cu_seqlens is None or seq_idx is not None):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as ext

        varlen = dict(cu_seqlens=cu_seqlens, return_varlen_states=True) if return_varlen_states else {}
        return ext(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                   dt_limit=dt_limit, return_final_states=return_final_states, **varlen)
    if ("triton" in backends and not return_varlen_states
            and triton_kernels.usable(x, dt, A, B, C, D, z, dt_bias, initial_states)):
        return triton_kernels.mamba_chunk_scan_combined_triton(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states)
    return mamba_chunk_scan_combined_torch(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                           initial_states=initial_states, seq_idx=seq_idx,
                                           cu_seqlens=cu_seqlens, dt_softplus=dt_softplus,
                                           dt_limit=dt_limit, return_final_states=return_final_states,
                                           return_varlen_states=return_varlen_states)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, cu_seqlens=None, seq_idx=None):
    """Mamba-1 scan. u/delta/z [b,d,l], A [d,n] (real), B/C [d,n] (constant), [b,n,l] or [b,g,n,l],
    D/delta_bias [d]; cu_seqlens [num_seqs+1] or seq_idx [b,l] reset the state between documents."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, seq_idx, cu_seqlens)
    seq_idx = document_index(seq_idx)
    backends = backends_for("scan", u.device)
    if seq_idx is None and cu_seqlens is None and "cuda-ext" in backends:
        # mamba_ssm's released CUDA scan has no document resets; with them we use our own path.
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as ext

        return ext(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                   delta_softplus=delta_softplus, return_last_state=return_last_state)
    if "triton" in backends and triton_kernels.usable(u, delta, A, B, C, D, z, delta_bias):
        return triton_kernels.selective_scan_triton(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                    delta_softplus=delta_softplus,
                                                    return_last_state=return_last_state,
                                                    cu_seqlens=cu_seqlens, seq_idx=seq_idx)
    return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                delta_softplus=delta_softplus, return_last_state=return_last_state,
                                cu_seqlens=cu_seqlens, seq_idx=seq_idx, chunked="chunked" in backends)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                   C_proj_bias=None, delta_softplus=True, *, checkpoint_lvl=1, cu_seqlens=None, seq_idx=None):
    """A whole Mamba-1 mixer after in_proj, as mamba_ssm's mamba_inner_fn: xz [b, 2*d, l] -> [b, l, o]."""
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
            A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)
    if (backend_for("inner", xz.device) == "cuda-ext" and cu_seqlens is None and seq_idx is None
            and conv1d_weight.dim() == 3 and not A.is_complex()):
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn as ext

        return ext(*args, checkpoint_lvl=checkpoint_lvl)
    return mamba_inner_torch(*args, checkpoint_lvl=checkpoint_lvl, cu_seqlens=cu_seqlens, seq_idx=seq_idx,
                             chunked="chunked" in backends_for("scan", xz.device))


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """A whole Mamba-2 mixer after in_proj, as mamba_ssm's mamba_split_conv1d_scan_combined."""
    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
            return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias,
            headdim, ngroups, norm_before_gate)
    if backend_for("split_scan", zxbcdt.device) == "cuda-ext":
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as ext

        return ext(*args)
    return mamba_split_conv1d_scan_combined_torch(*args)


def _ext_conv_handles(x, weight, bias, seq_idx, initial_states, return_final_states,
                      final_states_out) -> bool:
    """What causal_conv1d's CUDA forward takes: width 2-4, no float64, bias in weight's dtype;
    seq_idx int32 without initial or final states; states only in the channel-last layout."""
    if (not 2 <= weight.shape[1] <= 4 or torch.float64 in (x.dtype, weight.dtype)
            or (bias is not None and bias.dtype != weight.dtype)):
        return False
    channel_last = x.stride(1) == 1
    if channel_last and (x.shape[1] % 8 or x.stride(0) % 8 or x.stride(2) % 8):
        return False  # its channel-last kernel reads 8 channels at a time
    if seq_idx is not None:
        return (seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and initial_states is None
                and not return_final_states and final_states_out is None and channel_last)
    if initial_states is not None and (initial_states.stride(1) != 1 or initial_states.dtype != x.dtype):
        return False
    wants_states = initial_states is not None or return_final_states or final_states_out is not None
    return not wants_states or x.stride(1) == 1


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None):
    """Depthwise causal conv. x [b,d,l], weight [d,w], bias [d], seq_idx [b,l] (negative = padding,
    output 0), initial_states [b,d,w-1]; returns y (and final states [b,d,w-1])."""
    check_conv_args(x, weight, bias, seq_idx, initial_states, final_states_out, activation)
    if (backend_for("conv1d", x.device) == "nki" and initial_states is None and not return_final_states
            and final_states_out is None):
        from kernels.nki.autograd import causal_conv1d_fn_nki

        return causal_conv1d_fn_nki(x, weight, bias, seq_idx=seq_idx, activation=activation)
    backends = backends_for("conv1d", x.device)
    if "cuda-ext" in backends and _ext_conv_handles(
            x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out):
        from causal_conv1d import causal_conv1d_fn as ext

        given = (("initial_states", initial_states), ("final_states_out", final_states_out),
                 ("return_final_states", return_final_states))
        states = {k: v for k, v in given if v is not None and v is not False}
        out = ext(x, weight, bias, seq_idx=seq_idx, activation=activation, **states)
        if seq_idx is None:
            return out
        # causal_conv1d before 1.5 computes padding positions (seq_idx < 0) too; they are 0 here.
        return out * (seq_idx >= 0).unsqueeze(1).to(out.dtype)
    if "triton" in backends and triton_kernels.usable(x, weight, bias, initial_states, final_states_out):
        return triton_kernels.causal_conv1d_triton(x, weight, bias, seq_idx=seq_idx,
                                                   initial_states=initial_states,
                                                   return_final_states=return_final_states,
                                                   final_states_out=final_states_out, activation=activation)
    return causal_conv1d_torch(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                               return_final_states=return_final_states, final_states_out=final_states_out,
                               activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decoding steps. x [b,d] or [b,d,l]; conv_state [b,d,s] (s >= w-1) updated in place, a ring
    buffer with cache_seqlens [b], a pool picked by conv_state_indices [b] (negative = padding)."""
    check_update_args(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    if (backend_for("conv1d_update", x.device) == "cuda-ext" and 2 <= weight.shape[1] <= 4
            and x.dtype == conv_state.dtype == weight.dtype and x.dtype != torch.float64
            and (conv_state_indices is None or bool((conv_state_indices >= 0).all()))
            and (bias is None or bias.dtype == weight.dtype)
            and all(t is None or t.dtype == torch.int32 for t in (cache_seqlens, conv_state_indices))):
        from causal_conv1d import causal_conv1d_update as ext

        given = (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices))
        ring = {k: v for k, v in given if v is not None}
        return ext(x, conv_state, weight, bias, activation, **ring)
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation, cache_seqlens=cache_seqlens,
                                      conv_state_indices=conv_state_indices)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One-token SSM update (Mamba-1 or Mamba-2 shapes, as mamba_ssm broadcasts them); state is
    updated in place; state_batch_indices [b] picks rows of a state pool (negative = padding)."""
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    # Padding rows (negative indices) take our path: mamba_ssm's kernel may not skip them.
    if backend_for("state_update", x.device) == "cuda-ext" and (
            state_batch_indices is None or bool((state_batch_indices >= 0).all())):
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ext

        if state_batch_indices is None:
            return ext(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return ext(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                   state_batch_indices=state_batch_indices)
    return selective_state_update_torch(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                        dt_softplus=dt_softplus, state_batch_indices=state_batch_indices)


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Mamba-2's grouped gated RMSNorm (kernels.norm); NKI kernels on XLA for whole 128-row tiles."""
    if backend_for("norm_gated", x.device) == "nki" and (x.numel() // x.shape[-1]) % 128 == 0:
        from kernels.nki.autograd import rms_norm_gated_nki

        return rms_norm_gated_nki(x, weight, z, eps, group_size, norm_before_gate)
    return _rms_norm_gated_torch(x, weight, z, eps, group_size, norm_before_gate)


def _fits(*specs) -> bool:
    """Each (tensor, shape) has exactly that shape; a (tensor, shape, None) may also be None.
    The C decode kernels take their sizes from a few tensors and trust the rest: any call whose
    layout they do not expect goes to the torch composition (which raises on illegal shapes)."""
    return all((t is None and len(spec) > 2) or (t is not None and tuple(t.shape) == spec[1])
               for spec in specs for t in spec[:1])


def _mamba2_c_layout(batch, zxbcdt_cols, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D,
                     norm_weight, ngroups) -> bool:
    if conv_state.dim() != 3 or ssm_state.dim() != 4 or conv_weight.dim() != 2 or ngroups < 1:
        return False
    _, nheads, headdim, dstate = ssm_state.shape
    d_inner, width = nheads * headdim, conv_weight.shape[1]
    conv_dim = d_inner + 2 * ngroups * dstate
    return (nheads % ngroups == 0 and width >= 1 and zxbcdt_cols == d_inner + conv_dim + nheads
            and D is not None and tuple(D.shape) in ((nheads,), (d_inner,))
            and _fits((conv_state, (batch, conv_dim, width)), (ssm_state, (batch, nheads, headdim, dstate)),
                      (conv_weight, (conv_dim, width)), (conv_bias, (conv_dim,), None), (A, (nheads,)),
                      (dt_bias, (nheads,)), (norm_weight, (d_inner,), None)))


def _c_decode(*tensors) -> bool:
    return os.environ.get("MAMBA_KERNELS") != "torch" and decode.eligible(*tensors)


@contextlib.contextmanager
def decoding_threads(rows: int, device: torch.device):
    """Around a token-by-token loop: torch runs single-threaded while the C decode kernels'
    worker threads own the other cores (torch's OpenMP threads and a spinning worker fighting
    over two cores made the Mamba-1 step 2.5x slower). Only where the C path runs."""
    if (rows > decode.DECODE_MAX_ROWS or device.type != "cpu" or os.environ.get("MAMBA_KERNELS") == "torch"
            or not decode.available()):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear(x, weight, bias=None):
    """F.linear; a few float32 CPU rows without autograd (decoding) use a C matrix-vector loop."""
    rows = x.numel() // max(1, x.shape[-1])
    if (rows <= decode.DECODE_MAX_ROWS and weight.dim() == 2
            and _fits((bias, weight.shape[:1], None)) and _c_decode(x, weight, bias)):
        return decode.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def add_rms_norm(hidden, residual, weight, eps=1e-5):
    """(rmsnorm(hidden + residual) * weight, hidden + residual); residual None means hidden alone."""
    if (_fits((residual, hidden.shape, None), (weight, hidden.shape[-1:]))
            and _c_decode(hidden, residual, weight)):
        return decode.add_rms_norm(hidden, residual, weight, eps)
    residual = hidden if residual is None else hidden + residual
    return rms_norm(residual, weight, eps), residual


def mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D, norm_weight,
                norm_eps=1e-5, norm_before_gate=False, ngroups=1, dt_limit=(0.0, math.inf)):
    """One Mamba-2 decoding step, from in_proj's output to out_proj's input.

    zxbcdt [b, d_inner + conv_dim + h] in the order [z, x, B, C, dt]; conv_state [b, conv_dim, w]
    and ssm_state [b, h, p, n] are updated in place; conv_weight [conv_dim, w]; A, dt_bias [h];
    D [h] or [h*p]; norm_weight [d_inner] for the grouped gated RMSNorm, or None for y * silu(z).
    Returns y [b, d_inner].
    """
    if (ssm_state.is_contiguous() and conv_state.is_contiguous() and zxbcdt.dim() == 2
            and _mamba2_c_layout(zxbcdt.shape[0], zxbcdt.shape[1], conv_state, ssm_state, conv_weight,
                                 conv_bias, A, dt_bias, D, norm_weight, ngroups)
            and _c_decode(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D,
                          norm_weight)):
        return decode.mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias,
                                  D, norm_weight, norm_eps, norm_before_gate, ngroups, dt_limit)
    batch = zxbcdt.shape[0]
    _, nheads, p, n = ssm_state.shape
    dt_bias = zxbcdt.new_zeros(nheads) if dt_bias is None else dt_bias
    d_inner = nheads * p
    z, xBC, dt = zxbcdt.split([d_inner, conv_state.shape[1], nheads], dim=-1)
    xBC = causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias, activation="silu")
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], dim=-1)
    D = D.view(nheads, p) if D.numel() == d_inner else D[:, None].expand(-1, p)
    dt = dt.float()
    if tuple(dt_limit) != (0.0, math.inf):  # clamp after softplus, as the chunked scan does
        dt = F.softplus(dt + dt_bias.float()).clamp(*dt_limit)
        bias, softplus = None, False
    else:
        bias, softplus = dt_bias[:, None].expand(-1, p), True
    y = selective_state_update(ssm_state, x.view(batch, nheads, p), dt[:, :, None].expand(-1, -1, p),
                               A[:, None, None].expand(-1, p, n), B.view(batch, ngroups, n),
                               C.view(batch, ngroups, n), D, dt_bias=bias, dt_softplus=softplus)
    y = y.reshape(batch, d_inner)
    if norm_weight is None:
        return y * F.silu(z)
    return rms_norm_gated(y, norm_weight, z, norm_eps, d_inner // ngroups, norm_before_gate)


def mamba2_block_step(hidden, residual, norm_weight, norm_eps, in_weight, in_bias, conv_state, ssm_state,
                      conv_weight, conv_bias, A, dt_bias, D, gate_norm_weight, gate_eps=1e-5,
                      norm_before_gate=False, ngroups=1, dt_limit=(0.0, math.inf), out_weight=None,
                      out_bias=None):
    """A whole pre-norm Mamba-2 block for one token: returns (out_proj(mixer(u)), residual) with
    residual = hidden + residual (or hidden) and u = rmsnorm(residual) * norm_weight.

    hidden, residual [b, d_model] or [b, 1, d_model]; the rest as in mamba2_step, plus in_proj and
    out_proj weights [out, in] and biases (or None). One C call on CPU for a few float32 rows.
    """
    rows = hidden.numel() // hidden.shape[-1]
    d_model = hidden.shape[-1]
    d_inner = ssm_state.shape[1] * ssm_state.shape[2] if ssm_state.dim() == 4 else -1
    if (rows <= decode.DECODE_MAX_ROWS and ssm_state.is_contiguous() and conv_state.is_contiguous()
            and in_weight.dim() == 2
            and _mamba2_c_layout(rows, in_weight.shape[0], conv_state, ssm_state, conv_weight, conv_bias, A,
                                 dt_bias, D, gate_norm_weight, ngroups)
            and _fits((residual, hidden.shape, None), (norm_weight, (d_model,)),
                      (in_weight, (in_weight.shape[0], d_model)), (in_bias, in_weight.shape[:1], None),
                      (out_weight, (d_model, d_inner)), (out_bias, (d_model,), None))
            and _c_decode(hidden, residual, norm_weight, in_weight, in_bias, conv_state, ssm_state,
                          conv_weight, conv_bias, A, dt_bias, D, gate_norm_weight, out_weight, out_bias)):
        return decode.mamba2_block_step(hidden, residual, norm_weight, norm_eps, in_weight, in_bias,
                                        conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D,
                                        gate_norm_weight, gate_eps, norm_before_gate, ngroups, dt_limit,
                                        out_weight, out_bias)
    u, residual = add_rms_norm(hidden, residual, norm_weight, norm_eps)
    zxbcdt = linear(u.reshape(-1, u.shape[-1]), in_weight, in_bias)
    y = mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, dt_bias, D,
                    gate_norm_weight, gate_eps, norm_before_gate, ngroups, dt_limit)
    return linear(y, out_weight, out_bias).view_as(hidden), residual


def mamba1_block_step(hidden, residual, norm_weight, norm_eps, in_weight, in_bias, conv_state, ssm_state,
                      conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight,
                      out_bias=None):
    """A whole pre-norm Mamba-1 block for one token: returns (out_proj(mixer(u)), residual) with
    residual = hidden + residual (or hidden) and u = rmsnorm(residual) * norm_weight.

    conv_state [b, d_inner, w] and ssm_state [b, d_inner, n] are updated in place; A [d_inner, n]
    (= -exp(A_log)); dt_bias, D [d_inner]; weights [out, in] as in state-spaces' Mamba.
    One C call on CPU for a few float32 rows.
    """
    rows = hidden.numel() // hidden.shape[-1]
    tensors = (hidden, residual, norm_weight, in_weight, in_bias, conv_state, ssm_state, conv_weight,
               conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight, out_bias)
    if (rows <= decode.DECODE_MAX_ROWS and ssm_state.is_contiguous() and conv_state.is_contiguous()
            and _mamba1_c_layout(rows, *tensors) and _c_decode(*tensors)):
        return decode.mamba1_block_step(*tensors[:2], norm_weight, norm_eps, *tensors[3:])
    u, residual = add_rms_norm(hidden, residual, norm_weight, norm_eps)
    out = mamba1_mixer_step(u, conv_state, ssm_state, *tensors[3:5], *tensors[7:])
    return out.view_as(hidden), residual


def _mamba1_c_layout(rows, hidden, residual, norm_weight, in_weight, in_bias, conv_state, ssm_state,
                     conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight,
                     out_bias) -> bool:
    if ssm_state.dim() != 3 or conv_weight.dim() != 2 or dt_proj_weight.dim() != 2 or out_weight is None:
        return False
    d_model, (_, d_inner, dstate) = hidden.shape[-1], ssm_state.shape
    width, dt_rank = conv_weight.shape[1], dt_proj_weight.shape[1]
    return width >= 1 and _fits(
        (residual, hidden.shape, None), (norm_weight, (d_model,)), (in_weight, (2 * d_inner, d_model)),
        (in_bias, (2 * d_inner,), None), (conv_state, (rows, d_inner, width)),
        (ssm_state, (rows, d_inner, dstate)),
        (conv_weight, (d_inner, width)), (conv_bias, (d_inner,), None),
        (x_proj_weight, (dt_rank + 2 * dstate, d_inner)), (dt_proj_weight, (d_inner, dt_rank)),
        (dt_bias, (d_inner,)), (A, (d_inner, dstate)), (D, (d_inner,)), (out_weight, (d_model, d_inner)),
        (out_bias, (d_model,), None))


def mamba1_mixer_step(u, conv_state, ssm_state, in_weight, in_bias, conv_weight, conv_bias, x_proj_weight,
                      dt_proj_weight, dt_bias, A, D, out_weight, out_bias=None):
    """The Mamba-1 mixer for one token, u [b, d_model] or [b, 1, d_model] -> out_proj output [b, d_model];
    composed of the ops above (the fused block's fallback, and Mamba-1 layers outside it)."""
    x, z = linear(u.reshape(-1, u.shape[-1]), in_weight, in_bias).chunk(2, dim=-1)
    x = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, activation="silu")
    dstate = ssm_state.shape[-1]
    dt, B, C = linear(x, x_proj_weight).split([dt_proj_weight.shape[1], dstate, dstate], dim=-1)
    y = selective_state_update(ssm_state, x, linear(dt, dt_proj_weight), A, B, C, D, z=z, dt_bias=dt_bias,
                               dt_softplus=True)
    return linear(y, out_weight, out_bias)
