"""Norms used by the mixers: RMSNorm, LayerNorm, and Mamba-2's grouped gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm computed in float32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Mamba-2's RMSNormGated: normalise each group of `group_size` channels.

    norm_before_gate=False (Mamba-2's choice): y = rmsnorm(x * silu(z)) * weight.
    """
    dtype = x.dtype
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    dim = xf.shape[-1]
    group_size = group_size or dim
    if dim % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {dim}")
    xg = xf.view(*xf.shape[:-1], dim // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.view_as(xf) * weight.float()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(dtype)
