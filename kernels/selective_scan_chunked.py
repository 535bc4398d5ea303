"""Mamba-1 selective scan as a chunked torch scan: a graph whose size does not grow with seq_len.

The sequential recurrence (kernels/selective_scan.py's torch loop) becomes one graph node group
per position when XLA traces it: 2,048 tokens unroll into 2,048 copies of the step, and the
compiler takes minutes. Here the length is cut into chunks of CHUNK_SIZE positions and

  1. inside every chunk, all chunks at once, the recurrence runs from a zero state for
     CHUNK_SIZE steps (h_j = a_j h_{j-1} + x_j, with a_j = exp(delta_j A), x_j = delta_j u_j B_j),
     keeping also the decay from the chunk start to each position (p_j = a_j p_{j-1});
  2. the state entering each chunk comes from a log-depth (Hillis-Steele) scan over the chunks
     of the affine maps h -> p_end h + h_end: ceil(log2(n_chunks)) steps;
  3. every position adds the carried-in state: h_j += p_j * H_in.

The traced graph holds CHUNK_SIZE steps plus log2(seq_len / CHUNK_SIZE) steps, for any seq_len.
Decays are multiplied, never divided or exponentiated as differences, so nothing can overflow,
and a document reset (a change of seq_idx) is a decay of exactly 0 at the document's first
position: no state crosses it, in the chunk or through the carry.

Memory: autograd keeps about 5 tensors of [batch, d_inner, seq_len, d_state] float32 (decays,
states and decays from the chunk start, and C times the carried-in state), as much as the step
loop (5.3; saved-tensor hooks at d_inner 1536, seq_len 512, d_state 16): 1 GB per layer at
d_inner 1536, 2,048 tokens, batch 1. CHUNK_SIZE = 16 keeps step 1 short (16 steps in the graph)
while each step still works on seq_len / 16 positions at once; the work is ~2x the loop's.
"""

from __future__ import annotations

import math

import torch

CHUNK_SIZE = 16


def _grouped(M: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """B or C as compacted by selective_scan_torch ([d,n] constant or [b,g',l,n], g' dividing
    groups) -> broadcastable against [b, groups, d/groups, l, n]."""
    if M.dim() == 2:
        return M.view(1, groups, per_group, 1, M.shape[-1])
    if M.shape[1] != groups:
        M = M.repeat_interleave(groups // M.shape[1], dim=1)
    return M.unsqueeze(2)


def scan_chunked(u, delta, A, B, C, seq_idx=None, chunk_size: int = CHUNK_SIZE):
    """u, delta [b,d,l] (delta already biased and softplus'ed), A [d,n], B/C [d,n] (constant) or
    [b,g,l,n] with g dividing d, seq_idx [b,l] or None (a change of value resets the state)
    -> (y [b,d,l] without D or gate, last state [b,d,n]), in u's dtype."""
    batch, dim, length = u.shape
    dstate = A.shape[1]
    groups = math.lcm(*(M.shape[1] for M in (B, C) if M.dim() == 4))  # 1 when both are constant
    per_group = dim // groups
    Q = chunk_size
    pad = (-length) % Q
    nchunks = (length + pad) // Q

    def padded(M):  # time is dim 2 in [b,d,l] and [b,g,l,n]; zeros = decay 1 and no input
        if M.dim() == 2 or not pad:
            return M
        shape = list(M.shape)
        shape[2] = pad
        return torch.cat([M, M.new_zeros(shape)], dim=2)

    u, delta, B, C = padded(u), padded(delta), padded(B), padded(C)
    full = (batch, groups, per_group, nchunks, Q, dstate)
    log_decay = (delta.view(batch, groups, per_group, length + pad, 1)
                 * A.view(1, groups, per_group, 1, dstate))
    if seq_idx is not None:  # a decay of exactly 0 where a document starts: -inf added before exp
        same = seq_idx[:, 1:] == seq_idx[:, :-1]
        starts = torch.cat([same.new_ones(batch, 1), same, same.new_ones(batch, pad)], dim=1)
        reset = torch.zeros(starts.shape, dtype=u.dtype, device=u.device).masked_fill(~starts, -math.inf)
        log_decay = log_decay + reset.view(batch, 1, 1, length + pad, 1)
    decay = torch.exp(log_decay).view(full)  # [b,g,r,c,Q,n]
    inputs = (delta * u).view(batch, groups, per_group, length + pad, 1) * _grouped(B, groups, per_group)
    inputs = inputs.view(full)

    # 1. inside each chunk, from a zero state (all chunks at once)
    h, p = inputs[..., 0, :].clone(), decay[..., 0, :]  # a copy: autograd need not keep all of inputs
    states, decays = [h], [p]
    for j in range(1, Q):
        h = decay[..., j, :] * h + inputs[..., j, :]
        p = decay[..., j, :] * p
        states.append(h)
        decays.append(p)
    # 2. carry across chunks: inclusive scan of (p_end, h_end) under (a2, x2) o (a1, x1) = (a2 a1, a2 x1 + x2)
    carry_decay, carry_state = p, h  # [b,g,r,c,n]
    step = 1
    while step < nchunks:
        shape = list(carry_state.shape)
        shape[3] = step
        prev_state = torch.cat([carry_state.new_zeros(shape), carry_state[:, :, :, :-step]], dim=3)
        prev_decay = torch.cat([carry_decay.new_ones(shape), carry_decay[:, :, :, :-step]], dim=3)
        carry_state = carry_decay * prev_state + carry_state
        carry_decay = carry_decay * prev_decay
        step *= 2
    last = carry_state[:, :, :, -1].reshape(batch, dim, dstate)
    shape = list(carry_state.shape)
    shape[3] = 1
    entering = torch.cat([carry_state.new_zeros(shape), carry_state[:, :, :, :-1]], dim=3)  # [b,g,r,c,n]
    # 3. y_j = C_j . (h_j + p_j * entering), position by position: autograd keeps only the h_j and
    # p_j it already has, not a new [b,d,l,n] tensor of full states
    Cq = _grouped(C, groups, per_group)
    Cq = Cq.reshape(*Cq.shape[:3], nchunks, Q, dstate) if C.dim() == 4 else Cq.unsqueeze(-2)
    ys = []
    for j in range(Q):
        C_j = Cq[..., j, :] if C.dim() == 4 else Cq[..., 0, :]
        ys.append((states[j] * C_j).sum(-1) + (decays[j] * (entering * C_j)).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length + pad)  # [b,g,r,c,Q] -> [b,d,l]
    return (y[:, :, :length] if pad else y), last
