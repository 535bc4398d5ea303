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

    Returns y [b,l,h,p] (no D, no gate) and the final state [b,h,p,n], all float32.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rep = nheads // ngroups
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
    nchunks = (length + pad) // Q

    # Layouts are chosen so the big matmuls read their operands without copies:
    # position-major [b,c,Q,h,p] for x and y, [b,c,g,n,r*p] for states.
    dA_cum = torch.cumsum((dt * A).view(batch, nchunks, Q, nheads), dim=2)  # [b,c,Q,h]
    x_dt = (x * dt.unsqueeze(-1)).view(batch, nchunks, Q, nheads, headdim)
    Bc = B.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)  # [b,c,g,Q,n]
    Cc = C.view(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)  # [b,c,g,Q,n]
    sc = None if seq_idx is None else seq_idx.view(batch, nchunks, Q)

    def grouped(t):  # [b,c,Q,h,p] -> [b,c,g,Q,r*p]
        return t.view(batch, nchunks, Q, ngroups, rep * headdim).transpose(2, 3)

    def ungrouped(t):  # [b,c,g,Q,r*p] -> [b,c,Q,h,p]
        return t.transpose(2, 3).reshape(batch, nchunks, Q, nheads, headdim)

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l.B_s) exp(cum_l - cum_s) dt_s x_s
    cum_h = dA_cum.transpose(2, 3)  # [b,c,h,Q]
    seg = cum_h.unsqueeze(-1) - cum_h.unsqueeze(-2)  # [b,c,h,Q,Q]
    allowed = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if sc is not None:
        allowed = (allowed & (sc.unsqueeze(-1) == sc.unsqueeze(-2))).unsqueeze(2)
    decay = torch.exp(seg.masked_fill(~allowed, -math.inf))
    CB = Cc @ Bc.transpose(-1, -2)  # [b,c,g,Q,Q]: once per group, not per head
    scores = (decay.view(batch, nchunks, ngroups, rep, Q, Q) * CB.unsqueeze(3)).view(
        batch, nchunks, nheads, Q, Q)
    y = (scores @ x_dt.transpose(2, 3).contiguous()).transpose(2, 3)  # [b,c,Q,h,p]

    # 2. state each chunk leaves at its end: sum_s exp(cum_last - cum_s) dt_s x_s B_s^T
    to_end = dA_cum[:, :, -1:] - dA_cum  # [b,c,Q,h]
    if sc is not None:
        to_end = to_end.masked_fill((sc != sc[..., -1:]).unsqueeze(-1), -math.inf)
    xw = x_dt * torch.exp(to_end).unsqueeze(-1)
    states = Bc.transpose(-1, -2) @ grouped(xw)  # [b,c,g,n,r*p]

    # 3. carry the state across chunks (a short loop over chunks; reset at document changes)
    chunk_decay = torch.exp(dA_cum[:, :, -1])  # [b,c,h]
    chunk_decay = chunk_decay.view(batch, nchunks, ngroups, 1, rep, 1)
    if initial_states is None:
        carried = states.new_zeros(batch, ngroups, dstate, rep, headdim)
    else:  # [b,h,p,n] -> [b,g,n,r,p]
        carried = initial_states.to(acc).view(batch, ngroups, rep, headdim, dstate).permute(
            0, 1, 4, 2, 3)
    if sc is not None:
        # document each carried state belongs to; the initial state belongs to the first one
        end_doc = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # [b,c+1]
        survives = (end_doc[:, 1:] == end_doc[:, :-1]).to(acc)  # no boundary inside chunk c
    if sc is not None:
        chunk_decay = chunk_decay * survives.view(batch, nchunks, 1, 1, 1, 1)
    entering = []
    # unbind, not indexing: indexing's backward would allocate a full zero tensor per chunk
    for keep, local in zip(chunk_decay.unbind(1),
                           states.view(batch, nchunks, ngroups, dstate, rep, headdim).unbind(1)):
        entering.append(carried)
        carried = carried * keep + local
    prev = torch.stack(entering, dim=1).view(batch, nchunks, ngroups, dstate, rep * headdim)
    final_state = carried.permute(0, 1, 3, 4, 2).reshape(batch, nheads, headdim, dstate)

    # 4. contribution of the state entering the chunk: exp(cum_l) C_l . state
    into = dA_cum
    if sc is not None:
        into = into.masked_fill((sc != end_doc[:, :-1].unsqueeze(-1)).unsqueeze(-1), -math.inf)
    y = y + ungrouped(Cc @ prev) * torch.exp(into).unsqueeze(-1)

    y = y.reshape(batch, nchunks * Q, nheads, headdim)
    return (y[:, :length] if pad else y), final_state


def mamba_chunk_scan_combined_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                    initial_states=None, seq_idx=None, dt_softplus=False,
                                    dt_limit=(0.0, math.inf), return_final_states=False):
    """Same contract as mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined."""
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
    return (y, final_state) if return_final_states else y
