"""torch.autograd.Functions over the NKI kernels: what kernels/dispatch.py calls for XLA tensors.

The kernels take fp32 or bf16 HBM tensors in the layouts below; the few layout changes and the
cheap [b, l, h] element-wise pieces (dt processing, dt * A, z gating) stay in torch, so autograd
handles them. Importing this module imports `neuronxcc.nki`.
"""

from __future__ import annotations

import torch

from kernels.nki import CHUNK, check_length
from kernels.nki import conv1d as conv_kernels

MAX_CONV_WIDTH = 4


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
        y = conv_kernels.causal_conv1d_fwd[batch](x, w32, b32, seq, silu=silu, tile_len=tile)
        ctx.save_for_backward(x, w32, b32, seq)
        ctx.meta = (silu, tile, bias is not None, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w32, b32, seq = ctx.saved_tensors
        silu, tile, has_bias, wdtype = ctx.meta
        dx, dw, db = conv_kernels.causal_conv1d_bwd[x.shape[0]](x, w32, b32, seq, dy.contiguous(),
                                                                 silu=silu, tile_len=tile)
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
