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

    u/delta [b,d,l], A [d,n], B/C [d,n] (constant), [b,n,l] or [b,g,n,l]
    -> (y [b,d,l], state [b,d,n]).
    """
    b, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(M):  # -> [b,d,n,l]
        if M.dim() == 2:
            return M[None, :, :, None].expand(b, dim, M.shape[1], length)
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    Bd, Cd = per_channel(B), per_channel(C)
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

    x [b,d,l], weight [d,w] -> (y [b,d,l], final [b,d,w-1]). Positions with seq_idx < 0 are
    padding: their output is 0 (causal_conv1d's convention).
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
        if seq_idx is not None:
            acc = acc * (seq_idx[:, t] >= 0).to(x.dtype)[:, None]
        outs.append(acc)
    y = torch.stack(outs, dim=-1)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y, full[:, :, -(width - 1):] if width > 1 else x.new_zeros(b, dim, 0)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    """Decoding steps, one token at a time, on a conv state kept as a plain list of past inputs.

    x [b,d] or [b,d,l]; conv_state [pool,d,s] (s >= w-1), updated in place: without cache_seqlens
    it holds the last s inputs, oldest first; with cache_seqlens [b] it is a ring buffer whose
    next write goes to cache_seqlens % s. conv_state_indices [b] picks each row's slot of the pool
    (negative: padding, output 0, state untouched). Returns y shaped like x.
    """
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    batch, dim, length = xs.shape
    width, slots = weight.shape[1], conv_state.shape[-1]
    out = xs.new_zeros(batch, dim, length)
    for i in range(batch):
        slot = i if conv_state_indices is None else int(conv_state_indices[i])
        if slot < 0:
            continue
        state = conv_state[slot]
        if cache_seqlens is None:
            history = [state[:, j] for j in range(slots)]  # oldest first
        else:
            pos = int(cache_seqlens[i])
            history = [state[:, (pos - slots + j) % slots] for j in range(slots)]
        for t in range(length):
            history.append(xs[i, :, t].to(state.dtype))
            acc = bias.to(x.dtype).clone() if bias is not None else xs.new_zeros(dim)
            for k in range(width):
                acc = acc + weight[:, k] * history[len(history) - width + k]
            out[i, :, t] = F.silu(acc) if activation in ("silu", "swish") else acc
        if cache_seqlens is None:
            conv_state[slot] = torch.stack(history[-slots:], dim=-1)
        else:
            for t in range(length):
                conv_state[slot, :, (pos + t) % slots] = xs[i, :, t]
    return out[..., 0] if squeeze else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """One recurrence step per row, row by row, head by head.

    Mamba-2: state [pool,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    Mamba-1: the same without the head axis. state_batch_indices [b] picks each row's state
    (negative: padding, output 0, state untouched). Returns y shaped like x.
    """
    heads = x.dim() == 3
    if not heads:
        x, dt, A, B, C = x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        z = None if z is None else z[:, None]
        D = None if D is None else D[None]
        dt_bias = None if dt_bias is None else dt_bias[None]
        state = state[:, None]
    batch, nheads = x.shape[:2]
    rep = nheads // B.shape[1]
    out = torch.zeros_like(x)
    for i in range(batch):
        slot = i if state_batch_indices is None else int(state_batch_indices[i])
        if slot < 0:
            continue
        for h in range(nheads):
            d = dt[i, h] + (dt_bias[h] if dt_bias is not None else 0)
            d = F.softplus(d) if dt_softplus else d
            new = torch.exp(d[:, None] * A[h]) * state[slot, h] + (d * x[i, h])[:, None] * B[i, h // rep]
            state[slot, h] = new
            y = new @ C[i, h // rep]
            if D is not None:
                y = y + D[h] * x[i, h]
            if z is not None:
                y = y * F.silu(z[i, h])
            out[i, h] = y
    return out if heads else out[:, 0]


def ssd_varlen_states_ref(x, dt, A, B, C, cu_seqlens, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The final state of every sequence of a packed row x [1,l,h,p] cut at cu_seqlens, each one
    run on its own with ssd_ref (initial_states [1,h,p,n] belongs to the first)
    -> [num_seqs,h,p,n]."""
    states = []
    bounds = [int(v) for v in cu_seqlens]
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        init = initial_states if i == 0 else None
        if e == s:
            empty = x.new_zeros(1, x.shape[2], x.shape[3], B.shape[3])
            states.append(empty if init is None else init.to(x.dtype))
            continue
        _, st = ssd_ref(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], dt_bias=dt_bias,
                        initial_states=init, dt_softplus=dt_softplus, dt_limit=dt_limit)
        states.append(st)
    return torch.cat(states, dim=0)


def rms_norm_gated_ref(x, weight, z=None, eps=1e-6, ngroups=1, norm_before_gate=True):
    """Gated RMSNorm over each of ngroups equal channel groups of x [..., d], in x's dtype:
    norm_before_gate: rmsnorm(x) * w * silu(z), else rmsnorm(x * silu(z)) * w."""
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    parts = []
    for part in x.chunk(ngroups, dim=-1):
        parts.append(part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps))
    y = torch.cat(parts, dim=-1) * weight
    if z is not None and norm_before_gate:
        y = y * F.silu(z)
    return y
