"""Mamba-2 SSD in Triton, forward and backward: chunked, with document resets and initial states.

Chunks of Q positions; one program per (batch row, chunk, group) loops over the group's heads, so
C·Bᵀ is formed once per group and dB / dC are summed over heads in registers. Per head, with
cum_t the cumulative dt·A inside the chunk, e the chunk's last position, and "document" the
stretch between resets (seq_idx changes):
  chunk state  T_c = Σ_τ exp(cum_e - cum_τ) dt_τ x_τ ⊗ B_τ       over τ in e's document
  passing      S_{c+1} = exp(cum_e) S_c + T_c, the first term only without a reset in the chunk
  output       y_t = Σ_{τ≤t, same document} (C_t·B_τ) exp(cum_t - cum_τ) dt_τ x_τ
                     + exp(cum_t) C_t·S_c, the last term only before the chunk's first reset
S_0 is the initial state. The backward runs the same steps in reverse (dS by a reverse pass over
the chunks); torch turns the gradient of the cumulative log decays into dt and A gradients. dt
arrives biased / softplus-ed / clamped by torch (which differentiates that), and torch applies D
and the z gate around the kernels, as kernels/ssd.py does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.ssd import check_ssd_args, process_dt
from kernels.triton._launch import check_device, check_dtype, interpreting, next_pow2


@triton.jit
def _chunk(dt_ptr, A_ptr, seq_ptr, b, c, h, length, nheads, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Positions of chunk c, their mask, dt, cumulative dt*A, its total, and per position the number of
    resets since the chunk began (equal counts = same document; 0 = the document of the state entering)."""
    offs = c * Q + tl.arange(0, Q)
    tmask = offs < length
    dt = tl.load(dt_ptr + (b * length + offs) * nheads + h, mask=tmask, other=0.0)
    dA = dt * tl.load(A_ptr + h).to(tl.float32)
    cum = tl.cumsum(dA, axis=0)
    total = tl.sum(dA, axis=0)
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * length + offs, mask=tmask, other=0)
        before = tl.load(seq_ptr + b * length + tl.maximum(offs - 1, 0), mask=tmask, other=0)
        nres = tl.cumsum(tl.where(tmask & (doc != before), 1, 0), axis=0)
    else:
        nres = offs * 0
    return offs, tmask, dt, cum, total, nres


@triton.jit
def _load_tile(ptr, b, offs, tmask, col, ncols, sb, sl, sc, mid_offset, BC: tl.constexpr):
    """[Q, BC] float32 tile of a [b, l, ..., cols] tensor at positions offs; zero outside."""
    cols = tl.arange(0, BC)
    return tl.load(ptr + b * sb + offs[:, None] * sl + mid_offset + cols[None, :] * sc,
                   mask=tmask[:, None] & (cols < ncols)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _ssd_chunk_state(x_ptr, dt_ptr, A_ptr, B_ptr, seq_ptr, states_ptr, decay_ptr,
                     length, nheads, hpg, headdim, dstate, nchunks,
                     sxb, sxl, sxh, sxp, sBb, sBl, sBg, sBn,
                     HAS_SEQ: tl.constexpr, PREC: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr,
                     BN: tl.constexpr):
    b, c, g = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    offs0 = c * Q + tl.arange(0, Q)
    Bt = _load_tile(B_ptr, b, offs0, offs0 < length, n, dstate, sBb, sBl, sBn, g * sBg, BN)
    for r in range(0, hpg):
        h = g * hpg + r
        offs, tmask, dt, cum, total, nres = _chunk(dt_ptr, A_ptr, seq_ptr, b, c, h, length, nheads, Q,
                                                   HAS_SEQ)
        resets = tl.max(nres, axis=0)
        w = tl.where(tmask & (nres == resets), tl.exp(total - cum) * dt, 0.0)
        xt = _load_tile(x_ptr, b, offs, tmask, p, headdim, sxb, sxl, sxp, h * sxh, BP)
        T = tl.dot(tl.trans(xt * w[:, None]), Bt, input_precision=PREC)  # [BP, BN]
        base = ((b * nchunks + c) * nheads + h) * headdim * dstate
        tl.store(states_ptr + base + p[:, None] * dstate + n[None, :], T,
                 mask=(p < headdim)[:, None] & (n < dstate)[None, :])
        tl.store(decay_ptr + (b * nheads + h) * nchunks + c, tl.where(resets == 0, tl.exp(total), 0.0))


@triton.jit
def _ssd_pass_fwd(states_ptr, decay_ptr, init_ptr, final_ptr, nheads, nchunks, size,
                  HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    """states[c]: T_c in, S_c (the state entering chunk c) out; final <- S_nchunks."""
    b, h, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    kmask = k < size
    S = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INIT:
        S += tl.load(init_ptr + (b * nheads + h) * size + k, mask=kmask, other=0.0).to(tl.float32)
    for c in range(0, nchunks):
        ptr = states_ptr + ((b * nchunks + c) * nheads + h) * size + k
        T = tl.load(ptr, mask=kmask, other=0.0)
        tl.store(ptr, S, mask=kmask)
        S = tl.load(decay_ptr + (b * nheads + h) * nchunks + c) * S + T
    tl.store(final_ptr + (b * nheads + h) * size + k, S, mask=kmask)


@triton.jit
def _ssd_pass_bwd(dstates_ptr, states_ptr, decay_ptr, dfinal_ptr, dinit_ptr, ddecay_ptr, nheads, nchunks,
                  size, BLOCK: tl.constexpr):
    """dstates[c]: Y_c = dL/dS_c through chunk c's outputs in, G_{c+1} = dL/dT_c out, where
    G_c = Y_c + decay_c G_{c+1} and G_nchunks = dL/d(final state); ddecay partials <G_{c+1}, S_c>;
    dinit <- G_0."""
    b, h, pid = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    kmask = k < size
    nblk = tl.num_programs(2)
    G = tl.load(dfinal_ptr + (b * nheads + h) * size + k, mask=kmask, other=0.0)
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        off = ((b * nchunks + c) * nheads + h) * size + k
        Y = tl.load(dstates_ptr + off, mask=kmask, other=0.0)
        S = tl.load(states_ptr + off, mask=kmask, other=0.0)
        tl.store(dstates_ptr + off, G, mask=kmask)
        tl.store(ddecay_ptr + ((b * nheads + h) * nchunks + c) * nblk + pid, tl.sum(G * S, axis=0))
        G = Y + tl.load(decay_ptr + (b * nheads + h) * nchunks + c) * G
    tl.store(dinit_ptr + (b * nheads + h) * size + k, G, mask=kmask)


@triton.jit
def _ssd_chunk_out(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, states_ptr, y_ptr, dstates_ptr,
                   length, nheads, hpg, headdim, dstate, nchunks,
                   sxb, sxl, sxh, sxp, sBb, sBl, sBg, sBn, sCb, sCl, sCg, sCn,
                   HAS_SEQ: tl.constexpr, BACKWARD: tl.constexpr, PREC: tl.constexpr,
                   Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """y (float32, [b,l,h,p] contiguous) of chunk c; BACKWARD: y_ptr holds dL/dy and dstates[c] gets
    Y_c = Σ_t exp(cum_t) [t before the first reset] dy_t ⊗ C_t."""
    b, c, g = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    offs0 = c * Q + tl.arange(0, Q)
    Ct = _load_tile(C_ptr, b, offs0, offs0 < length, n, dstate, sCb, sCl, sCn, g * sCg, BN)
    if not BACKWARD:
        Bt = _load_tile(B_ptr, b, offs0, offs0 < length, n, dstate, sBb, sBl, sBn, g * sBg, BN)
        CB = tl.dot(Ct, tl.trans(Bt), input_precision=PREC)  # [Q, Q], shared by the group's heads
    pn_mask = (p < headdim)[:, None] & (n < dstate)[None, :]
    for r in range(0, hpg):
        h = g * hpg + r
        offs, tmask, dt, cum, total, nres = _chunk(dt_ptr, A_ptr, seq_ptr, b, c, h, length, nheads, Q,
                                                   HAS_SEQ)
        e = tl.where(tmask & (nres == 0), tl.exp(cum), 0.0)
        base = ((b * nchunks + c) * nheads + h) * headdim * dstate + p[:, None] * dstate + n[None, :]
        yt = y_ptr + ((b * length + offs[:, None]) * nheads + h) * headdim + p[None, :]
        qp_mask = tmask[:, None] & (p < headdim)[None, :]
        if not BACKWARD:
            same = (nres[:, None] == nres[None, :]) & (offs[:, None] >= offs[None, :])
            L = tl.exp(tl.where(same, cum[:, None] - cum[None, :], float("-inf")))
            xt = _load_tile(x_ptr, b, offs, tmask, p, headdim, sxb, sxl, sxp, h * sxh, BP)
            y = tl.dot(CB * L * dt[None, :], xt, input_precision=PREC)
            S = tl.load(states_ptr + base, mask=pn_mask, other=0.0)
            y += e[:, None] * tl.dot(Ct, tl.trans(S), input_precision=PREC)
            tl.store(yt, y, mask=qp_mask)
        else:
            dy = tl.load(yt, mask=qp_mask, other=0.0)
            tl.store(dstates_ptr + base, tl.dot(tl.trans(dy * e[:, None]), Ct, input_precision=PREC),
                     mask=pn_mask)


@triton.jit
def _ssd_chunk_bwd(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, states_ptr, dstates_ptr, decay_ptr,
                   ddecay_ptr, dy_ptr, dx_ptr, ddt_ptr, dcum_ptr, dB_ptr, dC_ptr,
                   length, nheads, hpg, headdim, dstate, nchunks, ngroups,
                   sxb, sxl, sxh, sxp, sBb, sBl, sBg, sBn, sCb, sCl, sCg, sCn,
                   HAS_SEQ: tl.constexpr, PREC: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr,
                   BN: tl.constexpr):
    """Gradients of chunk c: dx, the direct part of ddt, d(cum) (torch turns it into dt / A
    gradients), and dB / dC summed over the group's heads."""
    b, c, g = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    offs0 = c * Q + tl.arange(0, Q)
    Bt = _load_tile(B_ptr, b, offs0, offs0 < length, n, dstate, sBb, sBl, sBn, g * sBg, BN)
    Ct = _load_tile(C_ptr, b, offs0, offs0 < length, n, dstate, sCb, sCl, sCn, g * sCg, BN)
    CB = tl.dot(Ct, tl.trans(Bt), input_precision=PREC)
    dB_acc = tl.zeros([Q, BN], dtype=tl.float32)
    dC_acc = tl.zeros([Q, BN], dtype=tl.float32)
    pn_mask = (p < headdim)[:, None] & (n < dstate)[None, :]
    last = tl.minimum(c * Q + Q, length) - 1
    for r in range(0, hpg):
        h = g * hpg + r
        offs, tmask, dt, cum, total, nres = _chunk(dt_ptr, A_ptr, seq_ptr, b, c, h, length, nheads, Q,
                                                   HAS_SEQ)
        e = tl.where(tmask & (nres == 0), tl.exp(cum), 0.0)
        w_decay = tl.where(tmask & (nres == tl.max(nres, axis=0)), tl.exp(total - cum), 0.0)
        w = w_decay * dt
        same = (nres[:, None] == nres[None, :]) & (offs[:, None] >= offs[None, :])
        L = tl.exp(tl.where(same, cum[:, None] - cum[None, :], float("-inf")))
        base = ((b * nchunks + c) * nheads + h) * headdim * dstate + p[:, None] * dstate + n[None, :]
        S = tl.load(states_ptr + base, mask=pn_mask, other=0.0)
        dT = tl.load(dstates_ptr + base, mask=pn_mask, other=0.0)
        xt = _load_tile(x_ptr, b, offs, tmask, p, headdim, sxb, sxl, sxp, h * sxh, BP)
        rows = ((b * length + offs[:, None]) * nheads + h) * headdim + p[None, :]
        qp_mask = tmask[:, None] & (p < headdim)[None, :]
        dy = tl.load(dy_ptr + rows, mask=qp_mask, other=0.0)
        # inside the chunk: y = W x with W = CB * L * dt_tau
        dW = tl.dot(dy, tl.trans(xt), input_precision=PREC)
        V = dW * CB * L
        dx = tl.dot(tl.trans(CB * L * dt[None, :]), dy, input_precision=PREC)
        ddt = tl.sum(V, axis=0)
        dCB = dW * L * dt[None, :]
        dC_acc += tl.dot(dCB, Bt, input_precision=PREC)
        dB_acc += tl.dot(tl.trans(dCB), Ct, input_precision=PREC)
        VW = V * dt[None, :]
        dcum = tl.sum(VW, axis=1) - tl.sum(VW, axis=0)
        # the state entering the chunk: y += e * C S^T
        dC_acc += e[:, None] * tl.dot(dy, S, input_precision=PREC)
        dcum += e * tl.sum(dy * tl.dot(Ct, tl.trans(S), input_precision=PREC), axis=1)
        # the chunk's contribution to the next state: T = sum_tau w_tau x_tau B_tau^T
        BdT = tl.dot(Bt, tl.trans(dT), input_precision=PREC)  # [Q, BP]
        dx += w[:, None] * BdT
        dB_acc += w[:, None] * tl.dot(xt, dT, input_precision=PREC)
        dw = tl.sum(xt * BdT, axis=1)
        ddt += dw * w_decay
        dcum -= dw * w
        # total = cum at the chunk's last position: from T's weights and from the chunk's decay
        dtotal = tl.sum(dw * w, axis=0) + tl.load(ddecay_ptr + (b * nheads + h) * nchunks + c) * tl.load(
            decay_ptr + (b * nheads + h) * nchunks + c)
        dcum += tl.where(offs == last, dtotal, 0.0)
        tl.store(dx_ptr + rows, dx, mask=qp_mask)
        tl.store(ddt_ptr + (b * length + offs) * nheads + h, ddt, mask=tmask)
        tl.store(dcum_ptr + (b * length + offs) * nheads + h, dcum, mask=tmask)
    qn = ((b * length + offs0[:, None]) * ngroups + g) * dstate + n[None, :]
    qn_mask = (offs0 < length)[:, None] & (n < dstate)[None, :]
    tl.store(dB_ptr + qn, dB_acc, mask=qn_mask)
    tl.store(dC_ptr + qn, dC_acc, mask=qn_mask)


CHUNK = 64  # positions per chunk on a GPU; results do not depend on it


def _geometry(x, B, chunk):
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    return (batch, length, nheads, headdim, ngroups, dstate, triton.cdiv(length, chunk),
            max(16, next_pow2(headdim)), max(16, next_pow2(dstate)))


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, init, seq, chunk):
        batch, length, nheads, headdim, ngroups, dstate, nchunks, BP, BN = _geometry(x, B, chunk)
        f32 = dict(dtype=torch.float32, device=x.device)
        states = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
        decay = torch.empty(batch, nheads, nchunks, **f32)
        final = torch.empty(batch, nheads, headdim, dstate, **f32)
        y = torch.empty(batch, length, nheads, headdim, **f32)
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        opt = lambda t: decay if t is None else t
        grid, hpg = (batch, nchunks, ngroups), nheads // ngroups
        common = (length, nheads, hpg, headdim, dstate, nchunks, *x.stride())
        _ssd_chunk_state[grid](x, dt, A, B, opt(seq), states, decay, *common, *B.stride(),
                               HAS_SEQ=seq is not None, PREC=prec, Q=chunk, BP=BP, BN=BN,
                               num_warps=4 if interpreting() else 8)
        size = headdim * dstate
        block = min(1024, next_pow2(size))
        _ssd_pass_fwd[(batch, nheads, triton.cdiv(size, block))](
            states, decay, opt(init), final, nheads, nchunks, size, HAS_INIT=init is not None, BLOCK=block)
        _ssd_chunk_out[grid](x, dt, A, B, C, opt(seq), states, y, states, *common, *B.stride(), *C.stride(),
                             HAS_SEQ=seq is not None, BACKWARD=False, PREC=prec, Q=chunk, BP=BP, BN=BN,
                             num_warps=4 if interpreting() else 8)
        ctx.save_for_backward(x, dt, A, B, C, seq, states, decay)
        ctx.chunk, ctx.prec, ctx.init_grad = chunk, prec, init is not None and init.requires_grad
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, seq, states, decay = ctx.saved_tensors
        chunk, prec = ctx.chunk, ctx.prec
        batch, length, nheads, headdim, ngroups, dstate, nchunks, BP, BN = _geometry(x, B, chunk)
        f32 = dict(dtype=torch.float32, device=x.device)
        dy = dy.float().contiguous()
        dfinal = dfinal.float().contiguous()
        opt = lambda t: decay if t is None else t
        grid, hpg = (batch, nchunks, ngroups), nheads // ngroups
        common = (length, nheads, hpg, headdim, dstate, nchunks, *x.stride())
        warps = 4 if interpreting() else 8
        dstates = torch.empty_like(states)
        _ssd_chunk_out[grid](x, dt, A, B, C, opt(seq), states, dy, dstates, *common, *B.stride(), *C.stride(),
                             HAS_SEQ=seq is not None, BACKWARD=True, PREC=prec, Q=chunk, BP=BP, BN=BN,
                             num_warps=warps)
        size = headdim * dstate
        block = min(1024, next_pow2(size))
        nblk = triton.cdiv(size, block)
        dinit = torch.empty(batch, nheads, headdim, dstate, **f32)
        ddecay = torch.empty(batch, nheads, nchunks, nblk, **f32)
        _ssd_pass_bwd[(batch, nheads, nblk)](dstates, states, decay, dfinal, dinit, ddecay, nheads, nchunks,
                                             size, BLOCK=block)
        ddecay = ddecay.sum(-1).contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ddt, dcum = torch.empty(batch, length, nheads, **f32), torch.empty(batch, length, nheads, **f32)
        dB, dC = torch.empty(B.shape, **f32), torch.empty(C.shape, **f32)
        _ssd_chunk_bwd[grid](x, dt, A, B, C, opt(seq), states, dstates, decay, ddecay, dy, dx, ddt, dcum,
                             dB, dC, *common[:6], ngroups, *x.stride(), *B.stride(), *C.stride(),
                             HAS_SEQ=seq is not None, PREC=prec, Q=chunk, BP=BP, BN=BN, num_warps=warps)
        # d(dt*A)_t = sum of d(cum) over the chunk's positions from t on
        pad = nchunks * chunk - length
        dcum = torch.nn.functional.pad(dcum, (0, 0, 0, pad)).view(batch, nchunks, chunk, nheads)
        d_dA = dcum.flip(2).cumsum(2).flip(2).reshape(batch, nchunks * chunk, nheads)[:, :length]
        ddt = ddt + d_dA * A.float()
        dA = (d_dA * dt).sum((0, 1))
        return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dinit if ctx.init_grad else None,
                None, None)


def mamba_chunk_scan_combined_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                     initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                                     dt_limit=(0.0, math.inf), return_final_states=False,
                                     return_varlen_states=False):
    """Same contract as kernels.ssd.mamba_chunk_scan_combined_torch (mamba_ssm's
    mamba_chunk_scan_combined): x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], D [h] or [h,p],
    z [b,l,h,p], initial_states [b,h,p,n], seq_idx [b,l]. chunk_size is accepted for that contract;
    the kernels use their own chunk (CHUNK), which the results do not depend on."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit)
    check_device(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("initial_states", initial_states)):
        check_dtype(name, t)
    if return_varlen_states:
        raise ValueError("return_varlen_states=True is served by the torch path "
                         "(kernels.ssd.mamba_chunk_scan_combined_torch), not the Triton kernels")
    if cu_seqlens is not None and seq_idx is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device, dtype=torch.int32),
                                          lengths)[None]
    dtype, length = x.dtype, x.shape[1]
    dtf = process_dt(dt.float(), None if dt_bias is None else dt_bias.float(), dt_softplus, dt_limit)
    if length == 0:  # nothing to launch
        y = x.float() * 0
        final = (initial_states.float() if initial_states is not None
                 else x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32))
    else:
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        y, final = _SSDTriton.apply(x, dtf.contiguous(), A, B, C, initial_states, seq, CHUNK)
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    y = y.to(dtype)
    return (y, final) if return_final_states else y
