"""The single place that chooses an implementation for each op."""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from kernels.conv1d import causal_conv1d_torch, causal_conv1d_update_torch
from kernels.selective_scan import selective_scan_torch
from kernels.ssd import mamba_chunk_scan_combined_torch
from kernels.step import selective_state_update_torch


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


_HAS_MAMBA_SSM = _has("mamba_ssm")
_HAS_CAUSAL_CONV1D = _has("causal_conv1d")


def backend_for(op: str, device: torch.device) -> str:
    """'cuda-ext' (mamba_ssm / causal_conv1d) or 'torch'. MAMBA_KERNELS=torch forces torch."""
    if os.environ.get("MAMBA_KERNELS") == "torch" or device.type != "cuda":
        return "torch"
    needs = {"conv1d": _HAS_CAUSAL_CONV1D, "conv1d_update": _HAS_CAUSAL_CONV1D}.get(op, _HAS_MAMBA_SSM)
    return "cuda-ext" if needs else "torch"


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, math.inf), return_final_states=False):
    """Mamba-2 SSD scan. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], seq_idx [b,l] int32."""
    nheads, ngroups = x.shape[2], B.shape[2]
    if nheads % ngroups:
        raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
    if backend_for("ssd", x.device) == "cuda-ext":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as ext

        return ext(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                   dt_limit=dt_limit, return_final_states=return_final_states)
    return mamba_chunk_scan_combined_torch(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                           initial_states=initial_states, seq_idx=seq_idx,
                                           dt_softplus=dt_softplus, dt_limit=dt_limit,
                                           return_final_states=return_final_states)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, seq_idx=None):
    """Mamba-1 scan. u/delta [b,d,l], A [d,n], B/C [b,n,l] or [b,g,n,l]; seq_idx [b,l] resets state."""
    if seq_idx is None and backend_for("scan", u.device) == "cuda-ext":
        # mamba_ssm's CUDA scan has no document resets; with seq_idx we use our own path.
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as ext

        return ext(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                   delta_softplus=delta_softplus, return_last_state=return_last_state)
    return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                delta_softplus=delta_softplus, return_last_state=return_last_state,
                                seq_idx=seq_idx)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, activation=None):
    """Depthwise causal conv. x [b,d,l], weight [d,w]; returns y (and final states [b,d,w-1])."""
    if backend_for("conv1d", x.device) == "cuda-ext" and initial_states is None:
        from causal_conv1d import causal_conv1d_fn as ext

        if not return_final_states:
            return ext(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return causal_conv1d_torch(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                               return_final_states=return_final_states, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decoding step; conv_state [b,d,w] is updated in place."""
    if backend_for("conv1d_update", x.device) == "cuda-ext":
        from causal_conv1d import causal_conv1d_update as ext

        return ext(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One-token SSM update (Mamba-1 or Mamba-2 shapes); state is updated in place."""
    if backend_for("state_update", x.device) == "cuda-ext":
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ext

        return ext(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return selective_state_update_torch(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                        dt_softplus=dt_softplus)
