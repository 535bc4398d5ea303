"""torch.autograd.Functions over the NKI kernels: what kernels/dispatch.py calls for XLA tensors.

Entry points with the dispatch's contracts: `mamba_chunk_scan_combined_nki`, `causal_conv1d_fn_nki`
(no initial / final states: those calls stay on the torch path) and `rms_norm_gated_nki`. The
kernels take fp32 or bf16 HBM tensors; the layout changes and the cheap [b, l, h] element-wise
pieces (dt processing, dt * A, the z gate of the scan) stay in torch, so autograd handles them.
Importing this module imports `neuronxcc.nki` (the real one, or the executor in tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.nki import CHUNK, check_length
from kernels.nki import conv1d as conv_kernels
from kernels.nki import norm as norm_kernels
from kernels.nki import ssd as ssd_kernels
from kernels.ssd import process_dt

MAX_CONV_WIDTH = 4
MAX_GROUP_STATE_COLUMNS = 16384  # heads per group x headdim: the SSD kernels keep [n, this] fp32 on chip


def _doc_ids(seq_idx, batch, length, device):
    """Document id per token as fp32 (exact below 2**24), [b, 1, l]; zeros without seq_idx."""
    if seq_idx is None:
        return torch.zeros(batch, 1, length, dtype=torch.float32, device=device)
    return seq_idx.to(torch.float32).reshape(batch, 1, length)


def _conv_tile_len(length: int) -> int:
    return 256 if length % 256 == 0 else CHUNK


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu):
        batch, dim, length = x.shape
        x = x.contiguous()
        w32 = weight.to(torch.float32).contiguous()
        b32 = (bias.to(torch.float32) if bias is not None else x.new_zeros(dim, dtype=torch.float32))
        b32 = b32.reshape(dim, 1).contiguous()
        seq = _doc_ids(seq_idx, batch, length, x.device)
        tile = _conv_tile_len(length)
        docs = seq_idx is not None
        y = conv_kernels.causal_conv1d_fwd[batch](x, w32, b32, seq, silu=silu, tile_len=tile, docs=docs)
        ctx.save_for_backward(x, w32, b32, seq)
        ctx.meta = (silu, tile, docs, bias is not None, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w32, b32, seq = ctx.saved_tensors
        silu, tile, docs, has_bias, wdtype = ctx.meta
        dx, dw, db = conv_kernels.causal_conv1d_bwd[x.shape[0]](x, w32, b32, seq, dy.contiguous(),
                                                                 silu=silu, tile_len=tile, docs=docs)
        dbias = db.sum(0).reshape(-1).to(wdtype) if has_bias else None
        return dx, dw.sum(0).to(wdtype), dbias, None, None


def causal_conv1d_nki(x, weight, bias=None, seq_idx=None, activation=None):
    """Depthwise causal conv on the NKI kernels. x [b, d, l] (l a multiple of 128), weight [d, w]
    with w <= 4, bias [d], seq_idx [b, l]; activation None or 'silu'. Returns y [b, d, l]."""
    check_length(x.shape[-1])
    if not 1 <= weight.shape[1] <= MAX_CONV_WIDTH:
        raise ValueError(f"conv width {weight.shape[1]} is not supported by the NKI kernel; use 1..4")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation={activation!r} is not supported; use None or 'silu'")
    return _CausalConv1d.apply(x, weight, bias, seq_idx, activation is not None)


def _shifted_doc_ids(seq_idx, batch, length, device):
    """[b, l+1, 1] fp32: the id of token t-1 at t (the first token's own id at 0)."""
    if seq_idx is None:
        return torch.zeros(batch, length + 1, 1, dtype=torch.float32, device=device)
    seq = seq_idx.to(torch.float32)
    return torch.cat([seq[:, :1], seq], dim=1).reshape(batch, length + 1, 1)


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, dA, B, C, D, seq_idx):
        batch, length = x.shape[:2]
        x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
        dt, dA, D = (t.to(torch.float32).contiguous() for t in (dt, dA, D))
        seqp = _shifted_doc_ids(seq_idx, batch, length, x.device)
        if not any(ctx.needs_input_grad):  # inference: no per-chunk states to write
            return ssd_kernels.ssd_fwd[batch, B.shape[2]](x, dt, dA, B, C, D, seqp, save_states=False)
        y, states = ssd_kernels.ssd_fwd[batch, B.shape[2]](x, dt, dA, B, C, D, seqp)
        ctx.save_for_backward(x, dt, dA, B, C, D, seqp, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, dA, B, C, D, seqp, states = ctx.saved_tensors
        grid = (x.shape[0], B.shape[2])
        dx, ddt, ddA, dB, dC, dD = ssd_kernels.ssd_bwd[grid](x, dt, dA, B, C, D, seqp, states,
                                                              dy.contiguous())
        return dx, ddt, ddA, dB.to(B.dtype), dC.to(C.dtype), dD.sum(0).squeeze(-1), None


def mamba_chunk_scan_nki(x, dt, A, B, C, D=None, z=None, dt_bias=None, seq_idx=None, dt_softplus=False,
                         dt_limit=(0.0, math.inf)):
    """Mamba-2 SSD on the NKI kernels (chunk 128). x [b, l, h, p] with l a multiple of 128,
    p <= 128; dt [b, l, h]; A [h]; B, C [b, l, g, n] with n <= 128; D [h] or [h*p]; z like x;
    seq_idx [b, l]. dt processing, dt*A and the z gate run in torch. Returns y [b, l, h, p]."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    check_length(length)
    if headdim > 128 or dstate > 128:
        raise ValueError(f"headdim {headdim} / d_state {dstate} over 128 are not supported by the NKI kernel")
    if nheads % ngroups:
        raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
    if nheads // ngroups * headdim > MAX_GROUP_STATE_COLUMNS:
        raise ValueError(f"{nheads // ngroups} heads per group x headdim {headdim} is over "
                         f"{MAX_GROUP_STATE_COLUMNS}: the group's states do not fit on chip; "
                         "use more groups or MAMBA_KERNELS=torch")
    dt = process_dt(dt.to(torch.float32), None if dt_bias is None else dt_bias.to(torch.float32),
                    dt_softplus, dt_limit)
    dA = dt * A.to(torch.float32)
    if D is None:
        Dhp = x.new_zeros(nheads, headdim, dtype=torch.float32)
    else:
        Dhp = D.to(torch.float32).reshape(nheads, -1).expand(nheads, headdim)
    y = _SSD.apply(x, dt, dA, B, C, Dhp, seq_idx)
    if z is not None:
        y = (y.to(torch.float32) * F.silu(z.to(torch.float32))).to(x.dtype)
    return y


def mamba_chunk_scan_combined_nki(x, dt, A, B, C, chunk_size=CHUNK, D=None, z=None, dt_bias=None,
                                  initial_states=None, seq_idx=None, dt_softplus=False,
                                  dt_limit=(0.0, math.inf), return_final_states=False):
    """kernels.dispatch.mamba_chunk_scan_combined's contract on the NKI kernels. chunk_size is
    accepted and unused (the kernels' chunk is 128; results do not depend on it); initial and
    final states are not supported: the dispatch sends those calls to the torch path."""
    if initial_states is not None or return_final_states:
        raise ValueError("the NKI SSD kernel has no initial_states / return_final_states; use the torch path")
    return mamba_chunk_scan_nki(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx,
                                dt_softplus=dt_softplus, dt_limit=dt_limit)


def causal_conv1d_fn_nki(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         activation=None):
    """kernels.dispatch.causal_conv1d_fn's contract on the NKI kernels, without initial / final
    states (the dispatch sends those calls to the torch path)."""
    if initial_states is not None or return_final_states:
        raise ValueError("the NKI conv kernel has no initial_states / return_final_states; "
                         "use the torch path")
    return causal_conv1d_nki(x, weight, bias, seq_idx=seq_idx, activation=activation)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, group_size, eps, norm_before_gate):
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        z2 = z.reshape(-1, dim).contiguous() if z is not None else x2  # z2 unused without a gate
        w = weight.to(torch.float32).reshape(1, dim).contiguous()
        flags = dict(eps=eps, gated=z is not None, norm_before_gate=norm_before_gate)
        y = norm_kernels.gated_rms_norm_fwd[x2.shape[0] // CHUNK](x2, z2, w, group_size, **flags)
        ctx.save_for_backward(x2, z2, w)
        ctx.meta = (x.shape, group_size, flags, weight.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, w = ctx.saved_tensors
        shape, group_size, flags, wdtype = ctx.meta
        dx, dz, dw = norm_kernels.gated_rms_norm_bwd[x2.shape[0] // CHUNK](
            x2, z2, w, dy.reshape(x2.shape).contiguous(), group_size, **flags)
        dz = dz.view(shape) if flags["gated"] else None
        return dx.view(shape), dz, dw.sum(0).to(wdtype), None, None, None


def rms_norm_gated_nki(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """kernels.norm.rms_norm_gated on the NKI kernels: x, z [..., d] with a multiple of 128 rows."""
    dim = x.shape[-1]
    group_size = group_size or dim
    if dim % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {dim}")
    rows = x.numel() // dim
    if rows % CHUNK:
        raise ValueError(f"{rows} rows is not a multiple of {CHUNK}, which the NKI norm kernel needs; "
                         "pad the batch or set MAMBA_KERNELS=torch")
    return _GatedRMSNorm.apply(x, z, weight, group_size, eps, norm_before_gate)
