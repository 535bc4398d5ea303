"""Depthwise causal conv1d (the short convolution in front of every Mamba scan).

Same calls as Dao-AILab/causal-conv1d's causal_conv1d_fn / causal_conv1d_update, any width,
in torch (float32 accumulation at least; float64 stays float64), on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    return y


def _check_activation(op: str, activation) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"{op}: activation={activation!r} is not supported; use None, 'silu' or 'swish'")


def _fail(op: str, message: str, error=ValueError):
    raise error(f"{op}: {message}")


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_common(op, x, weight, bias, extra):
    for label, t in (("x", x), ("weight", weight), ("bias", bias), *extra):
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(op, f"{label} must be a tensor or None, got {type(t).__name__}", TypeError)
        if t is not None and t.device != x.device:
            _fail(op, f"{label} is on {t.device} but x is on {x.device}")
    for label, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            _fail(op, f"{label} must be a floating-point tensor, got {t.dtype}", TypeError)
    if weight.dim() != 2:
        hint = " (a Conv1d weight [dim, 1, width] needs .squeeze(1))" if weight.dim() == 3 else ""
        _fail(op, f"weight must be (dim, width), got {tuple(weight.shape)}{hint}")
    dim = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (dim,):
        _fail(op, f"bias must have shape (dim,)=({dim},), got {tuple(bias.shape)}")


def check_conv_args(x, weight, bias=None, seq_idx=None, initial_states=None, final_states_out=None,
                    activation=None):
    op = "causal_conv1d_fn"
    _check_activation(op, activation)
    _check_common(op, x, weight, bias, (("seq_idx", seq_idx), ("initial_states", initial_states),
                                        ("final_states_out", final_states_out)))
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        _fail(op, f"x must be (batch, dim, seqlen) with dim={dim} (weight's rows), got {tuple(x.shape)}")
    batch, _, length = x.shape
    if seq_idx is not None:
        if not _is_int(seq_idx):
            _fail(op, f"seq_idx must be an integer tensor, got {seq_idx.dtype}", TypeError)
        if tuple(seq_idx.shape) != (batch, length):
            _fail(op, f"seq_idx must have shape (batch, seqlen)={(batch, length)}, "
                      f"got {tuple(seq_idx.shape)}")
    for label, t in (("initial_states", initial_states), ("final_states_out", final_states_out)):
        if t is not None and tuple(t.shape) != (batch, dim, width - 1):
            _fail(op, f"{label} must have shape (batch, dim, width - 1)={(batch, dim, width - 1)}, "
                      f"got {tuple(t.shape)}")


def causal_conv1d_torch(x, weight, bias=None, seq_idx=None, initial_states=None,
                        return_final_states=False, final_states_out=None, activation=None):
    """x [b,d,l], weight [d,w], bias [d], seq_idx [b,l], initial_states [b,d,w-1].

    With seq_idx, output t only sees inputs of its own document (the window never straddles a
    boundary), positions with seq_idx < 0 are padding and output 0, and the initial state belongs
    to the row's first document. final_states are the last w-1 inputs (zero-padded when l < w-1),
    written into final_states_out when given. Output in x's dtype, whatever weight's dtype.
    """
    check_conv_args(x, weight, bias, seq_idx, initial_states, final_states_out, activation)
    batch, dim, length = x.shape
    width = weight.shape[1]
    acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    xa, wa = x.to(acc), weight.to(acc)
    ba = None if bias is None else bias.to(acc)
    history = (initial_states.to(acc) if initial_states is not None
               else xa.new_zeros(batch, dim, width - 1))
    full = torch.cat([history, xa], dim=-1)  # [b,d,w-1+l]
    if seq_idx is None:
        y = F.conv1d(full, wa.unsqueeze(1), ba, groups=dim)
    else:
        # Sum of w shifted copies, each masked where its source lies in another document.
        first_doc = seq_idx[:, :1].expand(batch, width - 1)
        docs = torch.cat([first_doc, seq_idx], dim=1)  # document of every column of `full`
        y = xa.new_zeros(batch, dim, length) if ba is None else ba[:, None].expand(batch, dim, length)
        for k in range(width):
            src = full[:, :, k:k + length]
            same = (docs[:, k:k + length] == seq_idx).unsqueeze(1)
            y = y + wa[:, k, None] * src * same
        y = y * (seq_idx >= 0).unsqueeze(1)  # padding positions output 0
    y = _activate(y, activation).to(x.dtype)
    if not (return_final_states or final_states_out is not None):
        return y
    final = full[:, :, full.shape[-1] - (width - 1):].to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return (y, final) if return_final_states else y


def check_update_args(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                      conv_state_indices=None):
    op = "causal_conv1d_update"
    _check_activation(op, activation)
    _check_common(op, x, weight, bias, (("conv_state", conv_state), ("cache_seqlens", cache_seqlens),
                                        ("conv_state_indices", conv_state_indices)))
    dim, width = weight.shape
    if x.dim() not in (2, 3) or x.shape[1] != dim:
        _fail(op, f"x must be (batch, dim) or (batch, dim, seqlen) with dim={dim}, got {tuple(x.shape)}")
    batch = x.shape[0]
    if conv_state.dim() != 3 or conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        _fail(op, f"conv_state must be (batch, dim, state_len) with dim={dim} and state_len >= "
                  f"width - 1 = {width - 1}, got {tuple(conv_state.shape)}")
    if not conv_state.is_floating_point():
        _fail(op, f"conv_state must be a floating-point tensor, got {conv_state.dtype}", TypeError)
    for label, t in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if t is None:
            continue
        if not _is_int(t):
            _fail(op, f"{label} must be an integer tensor, got {t.dtype}", TypeError)
        if tuple(t.shape) != (batch,):
            _fail(op, f"{label} must have shape (batch,)=({batch},), got {tuple(t.shape)}")
    if conv_state_indices is None and conv_state.shape[0] != batch:
        _fail(op, f"conv_state must have x's batch {batch} rows (or pass conv_state_indices), "
                  f"got {tuple(conv_state.shape)}")
    if conv_state_indices is not None and conv_state_indices.numel() and x.device.type == "cpu":
        if int(conv_state_indices.max()) >= conv_state.shape[0]:
            _fail(op, f"conv_state_indices must be < conv_state.shape[0]={conv_state.shape[0]}, "
                      f"got {int(conv_state_indices.max())}")
    if width == 1 and cache_seqlens is not None and conv_state.shape[2] == 0:
        _fail(op, "cache_seqlens needs a conv_state with state_len >= 1")


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                               conv_state_indices=None):
    """Decoding steps. x [b,d] or [b,d,l]; conv_state [b,d,s] with s >= w-1, updated in place.

    Without cache_seqlens the state holds the last s inputs, oldest first (shifted by l). With
    cache_seqlens [b] it is a ring buffer: the window ends just before cache_seqlens % s, and the
    new inputs are written from there. conv_state_indices [b] makes conv_state a pool [P,d,s] and
    picks each row's slot; a negative index marks a padding row (output 0, no state touched).
    """
    check_update_args(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    batch, dim, length = xs.shape
    width, slots = weight.shape[1], conv_state.shape[-1]
    acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    if conv_state_indices is None:
        rows = None
        state = conv_state
    else:
        valid = conv_state_indices >= 0
        rows = conv_state_indices.long().clamp(min=0)
        state = conv_state[rows]  # a gathered copy; written back below
    if cache_seqlens is None:
        window = state[:, :, slots - (width - 1):] if width > 1 else state[:, :, :0]
    else:
        start = cache_seqlens.long()[:, None] - (width - 1) + torch.arange(width - 1, device=x.device)
        index = torch.remainder(start, max(slots, 1))[:, None, :].expand(batch, dim, width - 1)
        window = state.gather(2, index)
    full = torch.cat([window.to(acc), xs.to(acc)], dim=-1)  # [b,d,w-1+l]
    if length == 1:  # one token: a dot product per channel (cheaper than conv1d's setup)
        y = (full * weight.to(acc)).sum(-1, keepdim=True)
        y = y if bias is None else y + bias.to(acc)[:, None]
    else:
        y = F.conv1d(full, weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc), groups=dim)
    y = _activate(y, activation)
    # the new state
    if cache_seqlens is None:
        new_state = torch.cat([state, xs.to(state.dtype)], dim=-1)[:, :, -slots:] if slots else state
    else:
        new_state = state.clone() if rows is None else state
        keep = min(length, slots)  # with more tokens than slots only the last `slots` survive
        pos = cache_seqlens.long()[:, None] + (length - keep) + torch.arange(keep, device=x.device)
        index = torch.remainder(pos, max(slots, 1))[:, None, :].expand(batch, dim, keep)
        new_state.scatter_(2, index, xs[:, :, length - keep:].to(state.dtype))
    if rows is None:
        conv_state.copy_(new_state)
    else:
        y = y * valid[:, None, None]
        conv_state[conv_state_indices[valid].long()] = new_state[valid]
    y = y.to(x.dtype)
    return y.squeeze(-1) if squeeze else y


def fill_conv_state(conv_state, x, seq_idx=None):
    """After a prefill of x [b,d,l]: conv_state [b,d,w] <- the last w inputs, zero-padded, and
    only those of the row's last document (that is the one decoding continues)."""
    length, width = x.shape[-1], conv_state.shape[-1]
    keep = min(length, width)
    tail = x[:, :, length - keep:]
    if seq_idx is not None:
        tail = tail * (seq_idx[:, length - keep:] == seq_idx[:, -1:]).unsqueeze(1)
    conv_state.zero_()
    conv_state[:, :, width - keep:] = tail
