"""Norms used by the mixers: RMSNorm, LayerNorm, and Mamba-2's grouped gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 at least: float64 inputs stay float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm computed in float32 (float64 for float64 input), returned in x's dtype."""
    acc = _acc(x)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Mamba-2's RMSNormGated: normalise each group of `group_size` channels.

    norm_before_gate=False (Mamba-2's choice): y = rmsnorm(x * silu(z)) * weight.
    """
    dtype, acc = x.dtype, _acc(x)
    xf = x.to(acc)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(acc))
    dim = xf.shape[-1]
    group_size = group_size or dim
    if dim % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {dim}")
    xg = xf.view(*xf.shape[:-1], dim // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.view_as(xf) * weight.to(acc)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(acc))
    return y.to(dtype)
