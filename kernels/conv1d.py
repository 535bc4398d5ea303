"""Depthwise causal conv1d (the short convolution in front of every Mamba scan)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"activation={activation!r} is not supported; use None or 'silu'")


def causal_conv1d_torch(x, weight, bias=None, seq_idx=None, initial_states=None,
                        return_final_states=False, activation=None):
    """x [b,d,l], weight [d,w], bias [d], seq_idx [b,l], initial_states [b,d,w-1].

    With seq_idx, output t only sees inputs of its own document (the window never
    straddles a boundary); the initial state belongs to the row's first document.
    final_states are the last w-1 inputs, as causal_conv1d returns them.
    """
    batch, dim, length = x.shape
    width = weight.shape[1]
    history = (initial_states.to(x.dtype) if initial_states is not None
               else x.new_zeros(batch, dim, width - 1))
    full = torch.cat([history, x], dim=-1)  # [b,d,w-1+l]
    if seq_idx is None:
        y = F.conv1d(full, weight.unsqueeze(1), bias, groups=dim)
    else:
        # Sum of w shifted copies, each masked where its source lies in another document.
        first_doc = seq_idx[:, :1].expand(batch, width - 1)
        docs = torch.cat([first_doc, seq_idx], dim=1)  # document of every column of `full`
        y = x.new_zeros(batch, dim, length) if bias is None else bias[:, None].expand(
            batch, dim, length).to(x.dtype)
        for k in range(width):
            src = full[:, :, k:k + length]
            same = (docs[:, k:k + length] == seq_idx).unsqueeze(1)
            y = y + weight[:, k, None] * src * same
    y = _activate(y, activation)
    if return_final_states:
        return y, full[:, :, full.shape[-1] - (width - 1):]
    return y


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation=None):
    """One decoding step. x [b,d]; conv_state [b,d,w] is rolled in place (newest input last)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    y = (conv_state * weight.to(conv_state.dtype)).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x.dtype)


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
