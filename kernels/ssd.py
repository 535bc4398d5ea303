"""Mamba-2 state space duality (SSD) scan in plain PyTorch, chunked.

The sequence is cut into chunks of Q positions. Inside a chunk the output is a masked
quadratic form (attention-like, with a decay mask); across chunks a small state
[h, p, n] is carried. Compared with the textbook four-step algorithm we
  * compute C·Bᵀ once per group, not once per head (ngroups is usually 1 or 8, heads 24+),
  * contract states with one large matmul per chunk over all heads of a group,
  * apply document resets (seq_idx) as masks, so packed rows never leak state.
Any device, any length (padded internally), float32 accumulation, autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Chunk sizes measured by bench/bench_ssd.py: small chunks keep the quadratic part cheap on CPU,
# GPUs prefer the large default that mamba_ssm uses.
CPU_CHUNK_SIZE = 64


def preferred_chunk_size(device: torch.device, requested: int) -> int:
    """The chunk size the torch path actually uses. Results do not depend on it."""
    if device.type == "cpu":
        return CPU_CHUNK_SIZE
    return requested


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """dt + bias, softplus (linear above 20, as mamba_ssm), then clamp to dt_limit."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_scan(x, dt, A, B, C, chunk_size, initial_states=None, seq_idx=None):
    """Core SSD: x [b,l,h,p], dt [b,l,h] (already processed), A [h], B/C [b,l,g,n].

    Returns y [b,l,h,p] (no D, no gate) and the final state [b,h,p,n], in float32 (float64 for
    float64 inputs).
    """
    batch, length, nheads, headdim = x.shape
    Q = chunk_size
    pad = (-length) % Q
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 accumulation at least
    x, dt, B, C, A = (t.to(acc) for t in (x, dt, B, C, A))
    if pad:
        # dt = 0 on padding: decay 1 and no input, so the final state is unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    init = None if initial_states is None else initial_states.to(acc)
    y, final_state = _ChunkedSSD.apply(x, dt, A, B, C, init, seq_idx, Q)
    return (y[:, :length] if pad else y), final_state


class _Masks:
    """Document masks for one call (all None without seq_idx)."""

    def __init__(self, seq_idx, batch, nchunks, Q, device):
        causal = torch.ones(Q, Q, dtype=torch.bool, device=device).tril()
        if seq_idx is None:
            self.blocked = ~causal  # [Q,Q]: s > l
            self.not_last_doc = self.not_from_prev = self.survives = None
            return
        sc = seq_idx.view(batch, nchunks, Q)
        self.blocked = (~(causal & (sc.unsqueeze(-1) == sc.unsqueeze(-2)))).unsqueeze(2)
        self.not_last_doc = (sc != sc[..., -1:]).unsqueeze(-1)  # [b,c,Q,1]
        # document each carried state belongs to; the initial state belongs to the first one
        end_doc = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # [b,c+1]
        self.not_from_prev = (sc != end_doc[:, :-1].unsqueeze(-1)).unsqueeze(-1)  # [b,c,Q,1]
        self.survives = end_doc[:, 1:] == end_doc[:, :-1]  # [b,c]: no boundary inside chunk


# Log-decays below this are treated as this: exp(-60) ~ 1e-26 is already nothing next to fp32
# epsilon, and it keeps products out of the denormal range, where CPUs slow down ~100x.
LOG_DECAY_FLOOR = -60.0


def _masked_exp(t, mask):
    t = t.clamp(min=LOG_DECAY_FLOOR)
    return torch.exp(t if mask is None else t.masked_fill(mask, -math.inf))


class _ChunkedSSD(torch.autograd.Function):
    """Forward and a hand-written backward. Layouts are chosen so the big matmuls read their
    operands without copies: position-major [b,c,Q,h,p] for x and y, [b,c,g,n,r*p] for states.
    Names: cum = cumulative dt*A inside a chunk; Lm = intra-chunk decay; W = decay to the chunk
    end; E = decay from the chunk start; a = decay over a whole chunk; P = state entering a chunk.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, init, seq_idx, Q):
        batch, length, nheads, headdim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        rep, nchunks = nheads // ngroups, length // Q
        shape = (batch, nchunks, ngroups, dstate, rep, headdim)
        m = _Masks(seq_idx, batch, nchunks, Q, x.device)

        cum = torch.cumsum((dt * A).view(batch, nchunks, Q, nheads), dim=2)  # [b,c,Q,h]
        xdt = (x * dt.unsqueeze(-1)).view(batch, nchunks, Q, nheads, headdim)
        Bc = B.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)  # [b,c,g,Q,n]
        Cc = C.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)

        # 1. inside each chunk: y_l = sum_{s<=l} (C_l.B_s) exp(cum_l - cum_s) dt_s x_s
        cum_h = cum.transpose(2, 3)  # [b,c,h,Q]
        Lm = _masked_exp(cum_h.unsqueeze(-1) - cum_h.unsqueeze(-2), m.blocked)  # [b,c,h,Q,Q]
        CB = Cc @ Bc.transpose(-1, -2)  # [b,c,g,Q,Q]: once per group, not per head
        Sc = (Lm.view(batch, nchunks, ngroups, rep, Q, Q) * CB.unsqueeze(3)).view(
            batch, nchunks, nheads, Q, Q)
        xdt_h = xdt.transpose(2, 3).contiguous()  # [b,c,h,Q,p]
        y = (Sc @ xdt_h).transpose(2, 3)  # [b,c,Q,h,p]

        # 2. state each chunk leaves at its end: sum_s exp(cum_last - cum_s) dt_s x_s B_s^T
        W = _masked_exp(cum[:, :, -1:] - cum, m.not_last_doc)  # [b,c,Q,h]
        xw = _grouped(xdt * W.unsqueeze(-1), ngroups)
        states = Bc.transpose(-1, -2) @ xw  # [b,c,g,n,r*p]

        # 3. carry the state across chunks (a short loop; reset at document changes)
        a = torch.exp(cum[:, :, -1])  # [b,c,h]
        if m.survives is not None:
            a = a * m.survives.unsqueeze(-1)
        a_v = a.view(batch, nchunks, ngroups, 1, rep, 1)
        carried = (x.new_zeros(shape[:1] + shape[2:]) if init is None
                   else init.view(batch, ngroups, rep, headdim, dstate).permute(0, 1, 4, 2, 3))
        P = x.new_empty(shape)
        P[:, 0] = carried
        states_v = states.view(shape)
        for c in range(nchunks - 1):  # P[c+1] = a[c] * P[c] + states[c], written in place
            torch.addcmul(states_v[:, c], P[:, c], a_v[:, c], out=P[:, c + 1])
        final = torch.addcmul(states_v[:, -1], P[:, -1], a_v[:, -1])
        final_state = final.permute(0, 1, 3, 4, 2).reshape(batch, nheads, headdim, dstate)

        # 4. contribution of the state entering the chunk: exp(cum_l) C_l . state
        E = _masked_exp(cum, m.not_from_prev)  # [b,c,Q,h]
        Pg = P.view(batch, nchunks, ngroups, dstate, rep * headdim)
        Z = _ungrouped(Cc @ Pg, nheads)  # [b,c,Q,h,p]
        y = y + Z * E.unsqueeze(-1)

        ctx.save_for_backward(x, dt, A, B, C, cum, Lm, CB, Sc, xdt_h, W, E, a, Pg, Z)
        ctx.meta = (Q, init is not None)
        return y.reshape(batch, length, nheads, headdim), final_state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, cum, Lm, CB, Sc, xdt_h, W, E, a, Pg, Z = ctx.saved_tensors
        Q, has_init = ctx.meta
        batch, length, nheads, headdim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        rep, nchunks = nheads // ngroups, length // Q
        dy = dy.to(x.dtype).reshape(batch, nchunks, Q, nheads, headdim)
        xdt = (x * dt.unsqueeze(-1)).view(batch, nchunks, Q, nheads, headdim)
        Bc = B.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)
        Cc = C.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)

        # 4. y += Z * E with Z = C @ P
        dE = (dy * Z).sum(-1)  # [b,c,Q,h]
        dZ = _grouped(dy * E.unsqueeze(-1), ngroups)  # [b,c,g,Q,r*p]
        dCc = dZ @ Pg.transpose(-1, -2)  # [b,c,g,Q,n]
        dP = (Cc.transpose(-1, -2) @ dZ).view(batch, nchunks, ngroups, dstate, rep, headdim)

        # 3. reverse the chunk recurrence  P_{c+1} = a_c P_c + states_c
        P = Pg.view(batch, nchunks, ngroups, dstate, rep, headdim)
        a_v = a.view(batch, nchunks, ngroups, 1, rep, 1)
        dstates = torch.empty_like(P)  # dL/d(states[c]) = dL/dP[c+1]
        if dfinal is None:
            dstates[:, -1] = 0
        else:
            dstates[:, -1] = dfinal.to(x.dtype).view(batch, ngroups, rep, headdim, dstate).permute(
                0, 1, 4, 2, 3)
        for c in range(nchunks - 1, 0, -1):
            torch.addcmul(dP[:, c], a_v[:, c], dstates[:, c], out=dstates[:, c - 1])
        dinit = None
        if has_init:
            G = torch.addcmul(dP[:, 0], a_v[:, 0], dstates[:, 0])
            dinit = G.permute(0, 1, 3, 4, 2).reshape(batch, nheads, headdim, dstate)
        da = (dstates * P).sum(dim=(3, 5)).view(batch, nchunks, nheads)

        # 2. states = B^T @ (xdt * W)
        dstates = dstates.view(batch, nchunks, ngroups, dstate, rep * headdim)
        xw = _grouped(xdt * W.unsqueeze(-1), ngroups)
        dBc = xw @ dstates.transpose(-1, -2)  # [b,c,g,Q,n]
        dxw = _ungrouped(Bc @ dstates, nheads)  # [b,c,Q,h,p]
        dxdt = dxw * W.unsqueeze(-1)
        dW = (dxw * xdt).sum(-1)  # [b,c,Q,h]

        # 1. y += (Lm * CB) @ xdt
        dY1 = dy.transpose(2, 3).contiguous()  # [b,c,h,Q,p]
        dSc = dY1 @ xdt_h.transpose(-1, -2)  # [b,c,h,Q,Q]
        dxdt = dxdt + (Sc.transpose(-1, -2) @ dY1).transpose(2, 3)
        dSc_g = dSc.view(batch, nchunks, ngroups, rep, Q, Q)
        dCB = (dSc_g * Lm.view_as(dSc_g)).sum(3)  # [b,c,g,Q,Q]
        dCc = dCc + dCB @ Bc
        dBc = dBc + dCB.transpose(-1, -2) @ Cc
        dSeg = (dSc_g * CB.unsqueeze(3)).view_as(Lm) * Lm  # through exp of the masked segsum

        # gradients of cum from every exp, then through the cumsum over each chunk
        dcum = (dSeg.sum(-1) - dSeg.sum(-2)).transpose(2, 3) + dE * E - dW * W
        dcum[:, :, -1] += (dW * W).sum(2) + da * a
        ddtA = dcum.flip(2).cumsum(2).flip(2).reshape(batch, length, nheads)

        dxdt = dxdt.reshape(batch, length, nheads, headdim)
        dx = dxdt * dt.unsqueeze(-1)
        ddt = (dxdt * x).sum(-1) + ddtA * A
        dA = (ddtA * dt).sum(dim=(0, 1))
        dB = dBc.transpose(2, 3).reshape(batch, length, ngroups, dstate)
        dC = dCc.transpose(2, 3).reshape(batch, length, ngroups, dstate)
        return dx, ddt, dA, dB, dC, dinit, None, None


def _grouped(t, ngroups):  # [b,c,Q,h,p] -> [b,c,g,Q,r*p]
    b, c, q, h, p = t.shape
    return t.reshape(b, c, q, ngroups, (h // ngroups) * p).transpose(2, 3)


def _ungrouped(t, nheads):  # [b,c,g,Q,r*p] -> [b,c,Q,h,p]
    b, c, g, q, rp = t.shape
    return t.transpose(2, 3).reshape(b, c, q, nheads, (g * rp) // nheads)


def _fail(message: str, error=ValueError):
    raise error(f"mamba_chunk_scan_combined: {message}")


def check_ssd_args(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   seq_idx=None, cu_seqlens=None, dt_limit=(0.0, math.inf)):
    """The shapes mamba_ssm's mamba_chunk_scan_combined accepts, else a clear error."""
    named = (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
             ("initial_states", initial_states), ("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens))
    for label, t in named:
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(f"{label} must be a tensor or None, got {type(t).__name__}", TypeError)
        if t is not None and t.device != x.device:
            _fail(f"{label} is on {t.device} but x is on {x.device}")
    for label, t in named[:9]:
        if t is not None and not t.is_floating_point():
            _fail(f"{label} must be a floating-point tensor, got {t.dtype}", TypeError)
    for label, t in named[9:]:
        if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            _fail(f"{label} must be an integer tensor, got {t.dtype}", TypeError)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        _fail(f"chunk_size must be a positive int, got {chunk_size!r}", TypeError)
    if x.dim() != 4:
        _fail(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, length, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape[2] < 1 or nheads % B.shape[2]:
        _fail(f"B must be (batch, seqlen, ngroups, dstate)=({batch}, {length}, ngroups, dstate) with "
              f"ngroups dividing nheads={nheads}, got {tuple(B.shape)}")
    dstate = B.shape[3]
    want = {"dt": (batch, length, nheads), "A": (nheads,), "C": tuple(B.shape), "z": tuple(x.shape),
            "dt_bias": (nheads,), "initial_states": (batch, nheads, headdim, dstate),
            "seq_idx": (batch, length)}
    given = dict(dt=dt, A=A, C=C, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx)
    for label, shape in want.items():
        t = given[label]
        if t is not None and tuple(t.shape) != shape:
            _fail(f"{label} must have shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        _fail(f"D must have shape ({nheads},) or {(nheads, headdim)}, got {tuple(D.shape)}")
    if len(tuple(dt_limit)) != 2:
        _fail(f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    if cu_seqlens is not None:
        if batch != 1:
            _fail(f"cu_seqlens needs the sequences packed into one row (batch 1), got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            _fail(f"cu_seqlens must be (num_sequences + 1,), got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
            _fail(f"cu_seqlens must start at 0, never decrease and end at seqlen={length}, got {cu}")
        if seq_idx is not None:
            changes = (seq_idx[0, 1:] != seq_idx[0, :-1]).nonzero().flatten().add(1).tolist()
            if changes != sorted(set(cu[1:-1]) - {0, length}):
                _fail(f"seq_idx changes at positions {changes} but cu_seqlens starts sequences at "
                      f"{cu[1:-1]}; pass one or make them agree")


def _varlen_states(x, dt, A, B, cu_seqlens, initial_states):
    """Final state of each sequence of the packed row: sum over its positions s of
    exp(dA from s+1 to its end) dt_s x_s B_s^T, plus the decayed initial state for the first."""
    nheads, ngroups = x.shape[2], B.shape[2]
    bounds = cu_seqlens.tolist()
    states = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        cum = torch.cumsum((dt[0, s:e] * A).double(), dim=0)  # [len,h], float64: long documents
        total = cum[-1] if e > s else cum.new_zeros(nheads)
        weight = (torch.exp(total - cum).to(x.dtype) * dt[0, s:e])  # [len,h]
        Bh = B[0, s:e].repeat_interleave(nheads // ngroups, dim=1)  # [len,h,n]
        state = torch.einsum("lh,lhp,lhn->hpn", weight, x[0, s:e], Bh)
        if i == 0 and initial_states is not None:
            state = state + torch.exp(total).to(x.dtype)[:, None, None] * initial_states[0].to(x.dtype)
        states.append(state)
    return torch.stack(states)


def mamba_chunk_scan_combined_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                    initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                                    dt_limit=(0.0, math.inf), return_final_states=False,
                                    return_varlen_states=False):
    """Same contract as mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined.

    cu_seqlens [num_seqs + 1] (batch 1) marks the packed sequences: without seq_idx it also stands
    for it (documents never leak state), and return_varlen_states=True adds their final states
    [num_seqs, h, p, n]. Returns y, then final_states, then varlen_states, as requested.
    """
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit)
    if return_varlen_states and cu_seqlens is None:
        _fail("return_varlen_states=True needs cu_seqlens")
    if cu_seqlens is not None and seq_idx is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_idx = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=x.device, dtype=torch.int32), lengths)[None]
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dt = process_dt(dt.to(acc), None if dt_bias is None else dt_bias.to(acc), dt_softplus, dt_limit)
    chunk = preferred_chunk_size(x.device, chunk_size)
    y, final_state = ssd_scan(x, dt, A, B, C, chunk, initial_states, seq_idx)
    if D is not None:
        Df = D.to(acc)
        y = y + x.to(acc) * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype)
    out = [y]
    if return_final_states:
        out.append(final_state)
    if return_varlen_states:
        out.append(_varlen_states(x.to(acc), dt, A.to(acc), B.to(acc), cu_seqlens, initial_states))
    return out[0] if len(out) == 1 else tuple(out)


def mamba_split_conv1d_scan_combined_torch(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                           initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                                           return_final_states=False, activation="silu", rmsnorm_weight=None,
                                           rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                                           headdim=None, ngroups=1, norm_before_gate=True):
    """mamba_ssm's mamba_split_conv1d_scan_combined (a whole Mamba-2 mixer after in_proj) composed
    of our ops. zxbcdt [b, l, 2*d_mlp + d + conv_dim + h] = [MLP pair | z | xBC | dt] with
    d = h*headdim, conv_dim = d + 2*ngroups*dstate; conv1d_weight [conv_dim, w]; D [h] (then
    headdim is required) or [h, headdim]. The gated RMSNorm (when rmsnorm_weight is given)
    normalises each of the ngroups groups, as mamba_ssm's fused kernel does; d_mlp > 0 puts
    silu(a) * b of the MLP pair in front of the mixer output, before outproj."""
    from kernels.conv1d import causal_conv1d_torch
    from kernels.norm import rms_norm_gated

    def fail(message):
        raise ValueError(f"mamba_split_conv1d_scan_combined: {message}")

    if D.dim() == 1 and headdim is None:
        fail("D of shape (nheads,) needs headdim")
    nheads, headdim = (D.shape[0], headdim) if D.dim() == 1 else tuple(D.shape)
    if zxbcdt.dim() != 3 or conv1d_weight.dim() != 2 or ngroups < 1 or nheads % ngroups:
        fail(f"zxbcdt must be (batch, seqlen, channels), conv1d_weight (conv_dim, width) and ngroups divide "
             f"nheads={nheads}; got {tuple(zxbcdt.shape)}, {tuple(conv1d_weight.shape)}, {ngroups}")
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    conv_dim = dim + 2 * ngroups * dstate
    d_mlp2 = zxbcdt.shape[-1] - dim - conv_dim - nheads
    if dstate < 1 or conv1d_weight.shape[0] != conv_dim:
        fail(f"conv1d_weight must have dim + 2 * ngroups * dstate rows (dim={dim}, ngroups={ngroups}), "
             f"got {tuple(conv1d_weight.shape)}")
    if d_mlp2 < 0 or d_mlp2 % 2:
        fail(f"zxbcdt's last axis must be 2 * d_mlp + {dim + conv_dim + nheads} (z, xBC, dt), got "
             f"{zxbcdt.shape[-1]}")
    for label, t, want in (("dt_bias", dt_bias, (nheads,)), ("A", A, (nheads,)), ("conv1d_bias", conv1d_bias,
                           (conv_dim,)), ("rmsnorm_weight", rmsnorm_weight, (dim,))):
        if t is not None and tuple(t.shape) != want:
            fail(f"{label} must have shape {want}, got {tuple(t.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        fail("outproj_bias needs outproj_weight")
    batch, length = zxbcdt.shape[:2]
    mlp, z, xBC, dt = zxbcdt.split([d_mlp2, dim, conv_dim, nheads], dim=-1)
    xBC = causal_conv1d_torch(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                              activation=activation).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    zh = z.reshape(batch, length, nheads, headdim)
    y, final = mamba_chunk_scan_combined_torch(
        x.reshape(batch, length, nheads, headdim), dt, A, B.reshape(batch, length, ngroups, dstate),
        C.reshape(batch, length, ngroups, dstate), chunk_size, D=D, z=zh if rmsnorm_weight is None else None,
        dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=True)
    out = y.reshape(batch, length, dim)
    if rmsnorm_weight is not None:
        out = rms_norm_gated(out, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_mlp2:
        a, b = mlp.chunk(2, dim=-1)
        out = torch.cat([F.silu(a) * b, out.to(a.dtype)], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final) if return_final_states else out
