"""Plain sequential recurrences: the oracles every kernel is tested against.

These are written for clarity, not speed: one time step at a time, in whatever
dtype the caller passes (tests use float64). They share no code with the fast
paths on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _same_doc(seq_idx: torch.Tensor | None, t: int, batch: int, device) -> torch.Tensor:
    """1.0 where position t continues the document of position t-1, else 0.0 (shape [batch])."""
    if seq_idx is None or t == 0:
        return torch.ones(batch, device=device)
    return (seq_idx[:, t] == seq_idx[:, t - 1]).to(torch.float64)


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """Mamba-2 recurrence. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n] -> (y [b,l,h,p], state [b,h,p,n])."""
    b, length, nheads, _ = x.shape
    ngroups = B.shape[2]
    rep = nheads // ngroups
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    Bh = B.repeat_interleave(rep, dim=2)
    Ch = C.repeat_interleave(rep, dim=2)
    state = (initial_states.to(x.dtype).clone() if initial_states is not None
             else x.new_zeros(b, nheads, x.shape[3], B.shape[3]))
    ys = []
    for t in range(length):
        keep = _same_doc(seq_idx, t, b, x.device).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = keep * decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       seq_idx=None):
    """Mamba-1 recurrence.

    u/delta [b,d,l], A [d,n], B/C [b,n,l] or [b,g,n,l] -> (y [b,d,l], state [b,d,n]).
    """
    b, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B = B[:, None]
    if C.dim() == 3:
        C = C[:, None]
    Bd = B.repeat_interleave(dim // B.shape[1], dim=1)  # [b,d,n,l]
    Cd = C.repeat_interleave(dim // C.shape[1], dim=1)
    state = u.new_zeros(b, dim, A.shape[1])
    ys = []
    for t in range(length):
        keep = _same_doc(seq_idx, t, b, u.device).to(u.dtype)[:, None, None]
        decay = torch.exp(delta[:, :, t, None] * A)
        state = keep * decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * Bd[..., t]
        ys.append((state * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, state


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None, activation=None):
    """Depthwise causal conv, one output at a time.

    x [b,d,l], weight [d,w] -> (y [b,d,l], final [b,d,w-1]).
    """
    b, dim, length = x.shape
    width = weight.shape[1]
    history = (initial_states.to(x.dtype) if initial_states is not None
               else x.new_zeros(b, dim, width - 1))
    full = torch.cat([history, x], dim=-1)
    outs = []
    for t in range(length):
        acc = bias.to(x.dtype).expand(b, dim).clone() if bias is not None else x.new_zeros(b, dim)
        for k in range(width):
            src = t - (width - 1) + k  # position in x; negative means initial state
            if seq_idx is not None:
                if src < 0:
                    # The initial state belongs to the row's first document only.
                    ok = (seq_idx[:, t] == seq_idx[:, 0]).to(x.dtype)
                else:
                    ok = (seq_idx[:, src] == seq_idx[:, t]).to(x.dtype)
            else:
                ok = torch.ones(b, dtype=x.dtype, device=x.device)
            acc = acc + ok[:, None] * weight[:, k] * full[:, :, src + width - 1]
        outs.append(acc)
    y = torch.stack(outs, dim=-1)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y, full[:, :, -(width - 1):] if width > 1 else x.new_zeros(b, dim, 0)
