"""Depthwise causal conv1d in Triton, forward and backward, with document resets (seq_idx) and
initial / final states; x may be channel-first ([b,d,l] contiguous) or channel-last (a [b,l,d]
tensor seen as [b,d,l], stride 1 over d): the kernels take strides, so neither is copied.

Each program computes a [channels, positions] tile as w shifted, masked copies of x, in float32.
The backward recomputes the pre-activation tile to get g = dL/d(pre-activation) and the
per-tile weight gradients, then a second kernel gathers dx (and the initial-state gradient)
from g with the taps reversed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.conv1d import check_conv_args
from kernels.triton._launch import check_device, check_dtype, interpreting


@triton.jit
def _tap(x_ptr, init_ptr, seq_ptr, doc_t, doc0, b, d, d_mask, t, k, length,
         sxb, sxd, sxl, sib, sid, sil, W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The input tap k sees for outputs t: x[t - (W-1) + k], the initial state before position 0,
    zero where that input lies in another document than t."""
    src = t - (W - 1) + k
    inside = (src >= 0) & (src < length)
    xv = tl.load(x_ptr + b * sxb + d[:, None] * sxd + src[None, :] * sxl,
                 mask=d_mask[:, None] & inside[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (src < 0) & (src + W - 1 >= 0)
        xv += tl.load(init_ptr + b * sib + d[:, None] * sid + (src + W - 1)[None, :] * sil,
                      mask=d_mask[:, None] & before[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        doc_src = tl.where(src >= 0, tl.load(seq_ptr + b * length + src, mask=inside, other=0), doc0)
        xv = tl.where((doc_src == doc_t)[None, :], xv, 0.0)
    return xv


@triton.jit
def _conv_fwd(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, y_ptr, dy_ptr, g_ptr, dw_ptr,
              dim, length, nlblk, sxb, sxd, sxl, syb, syd, syl, sib, sid, sil, sgb, sgd, sgl,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
              SILU: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Forward: y = act(bias + sum_k w_k * tap_k). BACKWARD: g = dy * act'(pre) into g_ptr (float32,
    [b,d,l] contiguous) and this tile's weight gradients into dw_ptr[b, l-block, d, k]."""
    b, pid_d, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # int64 offsets
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask, t_mask = d < dim, t < length
    mask = d_mask[:, None] & t_mask[None, :]
    doc_t = tl.load(seq_ptr + b * length + t, mask=t_mask, other=-1) if HAS_SEQ else 0
    doc0 = tl.load(seq_ptr + b * length) if HAS_SEQ else 0
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d * W + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += wk[:, None] * _tap(x_ptr, init_ptr, seq_ptr, doc_t, doc0, b, d, d_mask, t, k, length,
                                  sxb, sxd, sxl, sib, sid, sil, W, HAS_INIT, HAS_SEQ)
    if HAS_SEQ:  # positions with seq_idx < 0 are padding: output 0 (and no gradient)
        acc = tl.where((doc_t >= 0)[None, :], acc, 0.0)
    if not BACKWARD:
        y = acc * tl.sigmoid(acc) if SILU else acc
        tl.store(y_ptr + b * syb + d[:, None] * syd + t[None, :] * syl, y, mask=mask)
    else:
        g = tl.load(dy_ptr + b * syb + d[:, None] * syd + t[None, :] * syl, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if SILU:
            sig = tl.sigmoid(acc)
            g = g * sig * (1.0 + acc * (1.0 - sig))
        if HAS_SEQ:
            g = tl.where((doc_t >= 0)[None, :], g, 0.0)
        tl.store(g_ptr + b * sgb + d[:, None] * sgd + t[None, :] * sgl, g, mask=mask)
        dw = dw_ptr + ((b * nlblk + pid_l) * dim + d) * W
        for k in tl.static_range(W):
            xv = _tap(x_ptr, init_ptr, seq_ptr, doc_t, doc0, b, d, d_mask, t, k, length,
                      sxb, sxd, sxl, sib, sid, sil, W, HAS_INIT, HAS_SEQ)
            tl.store(dw + k, tl.sum(g * xv, axis=1), mask=d_mask)


@triton.jit
def _conv_bwd_x(g_ptr, w_ptr, seq_ptr, dx_ptr, dinit_ptr, dim, length,
                sgb, sgd, sgl, sxb, sxd, sxl, sib, sid, sil,
                W: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Gradient of every column f of [initial state | x] (f < W-1: the initial state), from the
    outputs t = f - k that read it through tap k."""
    b, pid_d, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # int64 offsets
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    f = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    pos = f - (W - 1)  # position in x
    d_mask = d < dim
    if HAS_SEQ:
        doc0 = tl.load(seq_ptr + b * length)
        doc_f = tl.where(pos >= 0, tl.load(seq_ptr + b * length + pos, mask=(pos >= 0) & (pos < length),
                                           other=0), doc0)
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for k in tl.static_range(W):
        t = f - k
        valid = (t >= 0) & (t < length)
        gv = tl.load(g_ptr + b * sgb + d[:, None] * sgd + t[None, :] * sgl,
                     mask=d_mask[:, None] & valid[None, :], other=0.0)
        if HAS_SEQ:
            doc_t = tl.load(seq_ptr + b * length + t, mask=valid, other=0)
            gv = tl.where((doc_t == doc_f)[None, :], gv, 0.0)
        wk = tl.load(w_ptr + d * W + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += wk[:, None] * gv
    in_x = (pos >= 0) & (pos < length)
    tl.store(dx_ptr + b * sxb + d[:, None] * sxd + pos[None, :] * sxl, acc,
             mask=d_mask[:, None] & in_x[None, :])
    if HAS_INIT:
        tl.store(dinit_ptr + b * sib + d[:, None] * sid + f[None, :] * sil, acc,
                 mask=d_mask[:, None] & (f < W - 1)[None, :])


def _blocks(x: torch.Tensor) -> tuple[int, int]:
    if interpreting() or x.device.type != "cuda":
        return 4, 16
    return (64, 16) if x.stride(1) == 1 else (16, 64)  # the long side of the tile along memory


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq, init, silu):
        batch, dim, length = x.shape
        width = weight.shape[1]
        bd, bl = _blocks(x)
        y = torch.empty_like(x)
        dummy = weight
        flags = dict(W=width, HAS_BIAS=bias is not None, HAS_SEQ=seq is not None, HAS_INIT=init is not None,
                     SILU=silu, BLOCK_D=bd, BLOCK_L=bl, num_warps=8)
        istr = init.stride() if init is not None else (0, 0, 0)
        _conv_fwd[(batch, triton.cdiv(dim, bd), triton.cdiv(length, bl))](
            x, weight, bias if bias is not None else dummy, seq if seq is not None else dummy,
            init if init is not None else dummy, y, dummy, dummy, dummy, dim, length, 1,
            *x.stride(), *y.stride(), *istr, 0, 0, 0, BACKWARD=False, **flags)
        ctx.save_for_backward(x, weight, bias, seq, init)
        ctx.flags = flags
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq, init = ctx.saved_tensors
        flags = ctx.flags
        batch, dim, length = x.shape
        width, bd, bl = flags["W"], flags["BLOCK_D"], flags["BLOCK_L"]  # (flags also holds num_warps)
        nlblk = triton.cdiv(length, bl)
        g = torch.empty_like(x, dtype=torch.float32)
        dw = torch.empty(batch, nlblk, dim, width, dtype=torch.float32, device=x.device)
        dummy = weight
        istr = init.stride() if init is not None else (0, 0, 0)
        _conv_fwd[(batch, triton.cdiv(dim, bd), nlblk)](
            x, weight, bias if bias is not None else dummy, seq if seq is not None else dummy,
            init if init is not None else dummy, dy, dy, g, dw, dim, length, nlblk,
            *x.stride(), *dy.stride(), *istr, *g.stride(), BACKWARD=True, **flags)
        dx = torch.empty_like(x)
        dinit = torch.empty_like(init) if init is not None else None
        _conv_bwd_x[(batch, triton.cdiv(dim, bd), triton.cdiv(length + width - 1, bl))](
            g, weight, seq if seq is not None else dummy, dx, dinit if dinit is not None else dummy,
            dim, length,
            *g.stride(), *dx.stride(), *(dinit.stride() if dinit is not None else (0, 0, 0)),
            W=width, HAS_SEQ=seq is not None, HAS_INIT=init is not None, BLOCK_D=bd, BLOCK_L=bl, num_warps=8)
        dbias = g.sum((0, 2)).to(bias.dtype) if bias is not None else None
        return dx, dw.sum((0, 1)).to(weight.dtype), dbias, None, dinit, None


def causal_conv1d_triton(x, weight, bias=None, seq_idx=None, initial_states=None,
                         return_final_states=False, final_states_out=None, activation=None):
    """Same contract as kernels.conv1d.causal_conv1d_torch: x [b,d,l] (channel-first or channel-last
    strides), weight [d,w], bias [d], seq_idx [b,l] (negative = padding, output 0), initial_states
    [b,d,w-1]; returns y in x's dtype (and the final states, the last w-1 inputs, when asked)."""
    check_conv_args(x, weight, bias, seq_idx, initial_states, final_states_out, activation)
    check_device(x, weight, bias, seq_idx, initial_states, final_states_out)
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("initial_states", initial_states)):
        check_dtype(name, t)
    batch, dim, length = x.shape
    width = weight.shape[1]
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    if length == 0:  # nothing to launch (an empty y, still in the graph)
        y = x * 0
    else:
        y = _CausalConv1dTriton.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                                      seq, initial_states, activation is not None)
    if not (return_final_states or final_states_out is not None):
        return y
    history = (initial_states.to(x.dtype) if initial_states is not None
               else x.new_zeros(batch, dim, width - 1))
    tail = x[:, :, max(0, length - (width - 1)):]
    final = torch.cat([history, tail], dim=-1)[:, :, tail.shape[-1]:]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return (y, final) if return_final_states else y
