"""Mamba-1 selective scan in Triton, forward and backward, with document resets (seq_idx).

The same design as kernels/csrc/selective_scan_cpu.c: one program per (batch row, group, block
of channels), sequential over time with the [channels, n] state in registers, so no
[b, l, d, n] tensor exists. The forward pass stores the state entering every K-th step; the
backward pass walks the K-step segments from the last, recomputes each segment's states from
its checkpoint into a small per-program scratch buffer, and runs the adjoint recurrence
backwards through it. delta bias/softplus, D and the z gate are fused into both passes.
dB / dC are summed over channels inside a program and over channel blocks by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.selective_scan import check_scan_args, seq_idx_from_cu_seqlens
from kernels.triton._launch import autotune, check_device, check_dtype, interpreting, next_pow2

CHECKPOINT_EVERY = 64  # K: steps between stored states (scratch per program is K * block * n floats)

_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (2, 2), (8, 2), (4, 3))]


@triton.jit
def _step_inputs(u_ptr, delta_ptr, bias, B_ptr, C_ptr, row, t, tm, d_mask, n_mask, sBl, sCl,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, delta (after bias/softplus, 0 past the end), its pre-softplus value, B_t and C_t."""
    uu = tl.load(u_ptr + row + t, mask=d_mask & tm, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + row + t, mask=d_mask & tm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    dt = tl.where(tm, dt, 0.0)  # past the end: decay 1, input 0, so the state stays put
    Bt = tl.load(B_ptr + t * sBl, mask=n_mask & tm, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + t * sCl, mask=n_mask & tm, other=0.0).to(tl.float32)
    return uu, dt, raw, Bt, Ct


@autotune(_CONFIGS, key=["dstate", "BLOCK_D", "K"])
@triton.jit
def _scan_fwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
              out_ptr, last_ptr, ckpt_ptr,
              dim, length, dpg, nseg, dstate,
              sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              HAS_SEQ: tl.constexpr, SAVE_CKPT: tl.constexpr,
              K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b, pid_g, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # int64 offsets
    j = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = j < dpg
    d = pid_g * dpg + j
    n = tl.arange(0, BLOCK_N)
    n_mask = n < dstate
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    row = (pid_b * dim + d).to(tl.int64) * length  # [b, d, l] contiguous
    Bp = B_ptr + pid_b * sBb + pid_g * sBg + n * sBn
    Cp = C_ptr + pid_b * sCb + pid_g * sCg + n * sCn
    seq_row = seq_ptr + pid_b * length
    prev = tl.load(seq_row) if HAS_SEQ else 0
    ck = ckpt_ptr + ((pid_b * dim + d[:, None]).to(tl.int64) * nseg) * dstate + n[None, :]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for seg in range(0, nseg):
        if SAVE_CKPT:
            tl.store(ck + seg * dstate, h, mask=dn_mask)
        for i in range(0, K):
            t = seg * K + i
            tm = t < length
            uu, dt, raw, Bt, Ct = _step_inputs(u_ptr, delta_ptr, bias, Bp, Cp, row, t, tm, d_mask, n_mask,
                                               sBl, sCl, HAS_BIAS, SOFTPLUS)
            a = tl.exp(dt[:, None] * A)
            if HAS_SEQ:
                cur = tl.load(seq_row + t, mask=tm, other=prev)
                a = tl.where(cur == prev, a, 0.0)
                prev = cur
            h = a * h + (dt * uu)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * uu
            if HAS_Z:
                zz = tl.load(z_ptr + row + t, mask=d_mask & tm, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(out_ptr + row + t, y, mask=d_mask & tm)
    tl.store(last_ptr + (pid_b * dim + d[:, None]) * dstate + n[None, :], h, mask=dn_mask)


@autotune(_CONFIGS, key=["dstate", "BLOCK_D", "K"])
@triton.jit
def _scan_bwd(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ckpt_ptr, dout_ptr,
              dlast_ptr, scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
              dim, length, dpg, nseg, dstate, nblk,
              sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr,
              K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b, pid_g, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # int64 offsets
    ngroups = tl.num_programs(1)
    j = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = j < dpg
    d = pid_g * dpg + j
    n = tl.arange(0, BLOCK_N)
    n_mask = n < dstate
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    row = (pid_b * dim + d).to(tl.int64) * length
    Bp = B_ptr + pid_b * sBb + pid_g * sBg + n * sBn
    Cp = C_ptr + pid_b * sCb + pid_g * sCg + n * sCn
    seq_row = seq_ptr + pid_b * length
    ck = ckpt_ptr + ((pid_b * dim + d[:, None]).to(tl.int64) * nseg) * dstate + n[None, :]
    scratch = scratch_ptr + ((pid_b * dim + d[:, None]).to(tl.int64) * K) * dstate + n[None, :]
    # dB / dC partial sums of this channel block: [b, g, nblk, l, n]
    part = ((pid_b * ngroups + pid_g) * nblk + pid_d).to(tl.int64) * length * dstate + n
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # a_{t+1} * dL/dh_{t+1}
    if HAS_DLAST:  # the last state is h_{l-1}: its gradient enters there
        carry += tl.load(dlast_ptr + (pid_b * dim + d[:, None]) * dstate + n[None, :], mask=dn_mask,
                         other=0.0)
    for sg in range(0, nseg):
        seg = nseg - 1 - sg
        h = tl.load(ck + seg * dstate, mask=dn_mask, other=0.0)
        prev = tl.load(seq_row + tl.maximum(seg * K - 1, 0)) if HAS_SEQ else 0
        for i in range(0, K):  # states entering each step of the segment -> scratch
            t = seg * K + i
            tm = t < length
            uu, dt, raw, Bt, Ct = _step_inputs(u_ptr, delta_ptr, bias, Bp, Cp, row, t, tm, d_mask, n_mask,
                                               sBl, sCl, HAS_BIAS, SOFTPLUS)
            tl.store(scratch + i * dstate, h, mask=dn_mask)
            a = tl.exp(dt[:, None] * A)
            if HAS_SEQ:
                cur = tl.load(seq_row + t, mask=tm, other=prev)
                a = tl.where(cur == prev, a, 0.0)
                prev = cur
            h = a * h + (dt * uu)[:, None] * Bt[None, :]
        tl.debug_barrier()
        for ii in range(0, K):
            i = K - 1 - ii
            t = seg * K + i
            tm = t < length
            uu, dt, raw, Bt, Ct = _step_inputs(u_ptr, delta_ptr, bias, Bp, Cp, row, t, tm, d_mask, n_mask,
                                               sBl, sCl, HAS_BIAS, SOFTPLUS)
            h_prev = tl.load(scratch + i * dstate, mask=dn_mask, other=0.0)
            a = tl.exp(dt[:, None] * A)
            if HAS_SEQ:
                cur = tl.load(seq_row + t, mask=tm, other=0)
                before = tl.load(seq_row + tl.maximum(t - 1, 0), mask=tm, other=0)
                a = tl.where(cur == before, a, 0.0)
            h_now = a * h_prev + (dt * uu)[:, None] * Bt[None, :]
            dy = tl.load(dout_ptr + row + t, mask=d_mask & tm, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + row + t, mask=d_mask & tm, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zz)
                y = tl.sum(h_now * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * uu
                tl.store(dz_ptr + row + t, dy * y * sig * (1.0 + zz * (1.0 - sig)), mask=d_mask & tm)
                dy = dy * zz * sig
            G = carry + dy[:, None] * Ct[None, :]  # dL/dh_t
            tl.store(dC_ptr + part + t * dstate, tl.sum(dy[:, None] * h_now, axis=0), mask=n_mask & tm)
            da = G * h_prev * a  # through a_t = exp(dt * A)
            dA_acc += da * dt[:, None]
            d_dt = tl.sum(da * A, axis=1)
            d_du = tl.sum(G * Bt[None, :], axis=1)
            tl.store(dB_ptr + part + t * dstate, tl.sum(G * (dt * uu)[:, None], axis=0), mask=n_mask & tm)
            carry = G * a
            du = d_du * dt
            if HAS_D:
                du += dy * Dv
                dD_acc += dy * uu
            ddt = d_du * uu + d_dt
            if SOFTPLUS:
                ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
            tl.store(du_ptr + row + t, du, mask=d_mask & tm)
            tl.store(ddelta_ptr + row + t, ddt, mask=d_mask & tm)
        tl.debug_barrier()  # the next segment reuses the scratch
    tl.store(dA_ptr + (pid_b * dim + d[:, None]) * dstate + n[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=d_mask)


def _block_d(batch: int, dpg: int, groups: int, device: torch.device) -> int:
    """Channels per program: as many as keep every SM busy with about two programs."""
    if interpreting() or device.type != "cuda":
        return min(4, next_pow2(dpg))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for block in (32, 16, 8):
        if batch * groups * triton.cdiv(dpg, block) >= 2 * sms:
            return min(block, next_pow2(dpg))
    return min(4, next_pow2(dpg))


def _geometry(u, B):
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    dpg = dim // groups
    block = _block_d(batch, dpg, groups, u.device)
    return batch, dim, length, groups, dstate, dpg, block, triton.cdiv(dpg, block)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, seq):
        batch, dim, length, groups, dstate, dpg, block, nblk = _geometry(u, B)
        K = CHECKPOINT_EVERY
        nseg = triton.cdiv(length, K)
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, dstate, dtype=torch.float32)
        ckpt = u.new_empty(batch, dim, nseg, dstate, dtype=torch.float32) if save else last
        opt = lambda t: last if t is None else t
        _scan_fwd[(batch, groups, nblk)](
            u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), opt(seq), out, last, ckpt,
            dim, length, dpg, nseg, dstate, *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_SEQ=seq is not None, SAVE_CKPT=save, K=K, BLOCK_D=block, BLOCK_N=next_pow2(dstate))
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq, ckpt)
            ctx.softplus, ctx.K = softplus, K
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, seq, ckpt = ctx.saved_tensors
        batch, dim, length, groups, dstate, dpg, block, nblk = _geometry(u, B)
        K, nseg = ctx.K, ckpt.shape[2]
        f32 = dict(dtype=torch.float32, device=u.device)
        dout = dout.contiguous()
        dlast = None if dlast is None else dlast.float().contiguous()
        scratch = torch.empty(batch, dim, K, dstate, **f32)
        du = torch.empty_like(u)
        ddelta = torch.empty(delta.shape, **f32) if delta_bias is not None else torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(batch, dim, dstate, **f32)
        dB = torch.empty(batch, groups, nblk, length, dstate, **f32)
        dC = torch.empty(batch, groups, nblk, length, dstate, **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        opt = lambda t: dA if t is None else t  # a placeholder pointer where a flag says "absent"
        _scan_bwd[(batch, groups, nblk)](
            u, delta, A, B, C, opt(D), opt(z), opt(delta_bias), opt(seq), ckpt, dout, opt(dlast), scratch,
            du, ddelta, opt(dz), dA, dB, dC, opt(dD),
            dim, length, dpg, nseg, dstate, nblk, *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_SEQ=seq is not None, HAS_DLAST=dlast is not None, K=K, BLOCK_D=block,
            BLOCK_N=next_pow2(dstate))
        dbias = ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        dB = dB.sum(2).transpose(-1, -2).to(B.dtype)
        dC = dC.sum(2).transpose(-1, -2).to(C.dtype)
        dD = dD.sum(0).to(D.dtype) if D is not None else None
        return (du, ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB, dC, dD, dz, dbias, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, cu_seqlens=None, seq_idx=None):
    """Same contract as kernels.selective_scan.selective_scan_torch (mamba_ssm's selective_scan_fn, real A,
    plus seq_idx [b,l]: a change of value resets the state, as cu_seqlens boundaries do).
    u, delta, z: [b,d,l]; A: [d,n]; B, C: [d,n] (constant), [b,n,l] or [b,g,n,l]; D, delta_bias: [d].
    Returns y in u's dtype (and the float32 last state, which unlike mamba_ssm's passes gradients back).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, seq_idx, cu_seqlens)
    check_device(u, delta, A, B, C, D, z, delta_bias, seq_idx)
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        check_dtype(name, t)
    batch, dim, length = u.shape
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, batch, u.device)

    def grouped(M):  # -> [b,g,n,l] (a view: autograd reshapes the gradient back)
        if M.dim() == 2:  # constant per channel: one group per channel, broadcast over b and l
            return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
        return M[:, None] if M.dim() == 3 else M

    Bg, Cg = grouped(B), grouped(C)
    if Bg.shape[1] != Cg.shape[1]:  # e.g. constant B with time-varying C: give both one group per channel
        Bg, Cg = (M.repeat_interleave(dim // M.shape[1], dim=1) for M in (Bg, Cg))
    if length == 0:  # nothing to launch: an empty y (still in the graph) and a zero state
        y, last = u * 0, u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)
        return (y, last) if return_last_state else y
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    y, last = _SelectiveScanTriton.apply(
        u.contiguous(), delta.contiguous(), A.contiguous(), Bg, Cg, None if D is None else D.contiguous(),
        None if z is None else z.contiguous(), None if delta_bias is None else delta_bias.contiguous(),
        bool(delta_softplus), seq)
    return (y, last) if return_last_state else y
