"""Peers for the benchmarks: the textbook algorithms our kernels are compared against.

`ssd_textbook` is the four-step chunked SSD algorithm as the Mamba-2 paper presents it
(B and C repeated for every head, einsum per step). `selective_scan_sequential` is the
straightforward per-time-step recurrence. Neither is used by the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """exp-able segment sums: out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, else -inf."""
    length = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, length)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~lower, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
    return out.masked_fill(~keep, -torch.inf)


def ssd_textbook(x, dt, A, B, C, chunk_size):
    """x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n] -> y [b,l,h,p]."""
    batch, length, nheads, headdim = x.shape
    rep = nheads // B.shape[2]
    B = B.repeat_interleave(rep, dim=2)
    C = C.repeat_interleave(rep, dim=2)
    x = x * dt.unsqueeze(-1)
    A = dt * A  # [b,l,h]

    def chunk(t):
        return t.reshape(batch, length // chunk_size, chunk_size, *t.shape[2:])

    x, A, B, C = chunk(x), chunk(A), chunk(B), chunk(C)
    A = A.permute(0, 3, 1, 2)  # [b,h,c,l]
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segsum(A))
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, x)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, x)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states = new_states[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (y_diag + y_off).reshape(batch, length, nheads, headdim)


def selective_scan_sequential(u, delta, A, B, C):
    """u/delta [b,d,l], A [d,n], B/C [b,n,l] -> y [b,d,l], one time step at a time."""
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[
            ..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)
