"""Mamba-2 mixer (Dao & Gu 2024), parameter names as state-spaces' `Mamba2`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels import (
    add_rms_norm,
    causal_conv1d_fn,
    linear,
    mamba2_block_step,
    mamba2_step,
    mamba_chunk_scan_combined,
    rms_norm_gated,
)
from kernels.conv1d import fill_conv_state
from mamba.model.init import inverse_softplus_dt


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x * silu(z)) * weight, normalised per group of `group_size` channels (all
    channels when group_size is None)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, math.inf),
                 bias=False, conv_bias=True, chunk_size=256, norm_across_channels=False,
                 layer_idx: int | None = None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.headdim, self.ngroups = headdim, ngroups
        self.nheads = self.d_inner // headdim
        self.dt_limit, self.chunk_size, self.layer_idx = tuple(dt_limit), chunk_size, layer_idx
        self.D_has_hdim = D_has_hdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        # in_proj output order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads,
                                 bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)

        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.A_init_range = tuple(A_init_range)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.dt_bias._no_weight_decay = True
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.d_inner if D_has_hdim else self.nheads))
        self.D._no_weight_decay = True
        # transformers < 5 normalises over all d_inner channels; everyone else per B/C group
        self.norm_groups = 1 if norm_across_channels else ngroups
        self.norm = (GatedRMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // self.norm_groups,
                                  norm_before_gate=norm_before_gate) if rmsnorm else None)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameters (children are initialised by mamba.model.init)."""
        with torch.no_grad():
            self.dt_bias.copy_(inverse_softplus_dt(self.nheads, *self.dt_range, like=self.dt_bias))
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*self.A_init_range)))
            self.D.fill_(1.0)

    def allocate_cache(self, batch: int, dtype, device):
        conv = torch.zeros(batch, self.conv_dim, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, dtype=torch.float32,
                          device=device)
        return conv, ssm

    def _split_proj(self, zxbcdt):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _gate_and_project(self, y, z):
        if self.norm is None:
            return self.out_proj(y * torch.nn.functional.silu(z))
        if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad):
            # recomputed in backward: autograd would otherwise keep four [b,l,d_inner] fp32
            # intermediates of the norm, and z's view keeps all of in_proj's output alive
            return self.out_proj(checkpoint(self.norm, y, z.contiguous(), use_reentrant=False))
        return self.out_proj(self.norm(y, z))

    def forward(self, hidden, seq_idx=None, cache=None):
        """hidden [b,l,d_model] -> [b,l,d_model]; cache = (conv_state, ssm_state) or None."""
        batch, length, _ = hidden.shape
        z, xBC, dt = self._split_proj(self.in_proj(hidden))
        xBC = xBC.transpose(1, 2)  # [b,conv_dim,l]
        if cache is not None:  # the conv window decoding continues from
            fill_conv_state(cache[0], xBC, seq_idx)
        xBC = causal_conv1d_fn(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                               seq_idx=seq_idx, activation="silu").transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state,
                             self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        y = mamba_chunk_scan_combined(
            x.reshape(batch, length, self.nheads, self.headdim), dt, A,
            B.reshape(batch, length, self.ngroups, self.d_state),
            C.reshape(batch, length, self.ngroups, self.d_state), self.chunk_size, D=D,
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            seq_idx=None if seq_idx is None else seq_idx.to(torch.int32),
            return_final_states=cache is not None)
        if cache is not None:
            y, final_state = y
            cache[1].copy_(final_state)
        return self._gate_and_project(y.reshape(batch, length, self.d_inner), z)

    def _step_params(self) -> dict:
        norm = self.norm
        return dict(conv_weight=self.conv1d.weight.squeeze(1), conv_bias=self.conv1d.bias,
                    A=-torch.exp(self.A_log.float()), dt_bias=self.dt_bias, D=self.D,
                    gate_norm_weight=None if norm is None else norm.weight,
                    gate_eps=1e-5 if norm is None else norm.eps,
                    norm_before_gate=norm is not None and norm.norm_before_gate,
                    ngroups=self.ngroups, dt_limit=self.dt_limit)

    def _norm_spans_groups(self) -> bool:
        """The decode kernels take one ngroups for B/C and the norm alike; a norm over all channels
        with several B/C groups is composed here instead (the kernel gates, we normalise)."""
        return self.norm is not None and self.norm_groups != self.ngroups

    def step(self, hidden, cache):
        """One token: hidden [b,1,d_model]; updates cache in place."""
        conv_state, ssm_state = cache
        zxbcdt = linear(hidden.squeeze(1), self.in_proj.weight, self.in_proj.bias)
        p = self._step_params()
        composed = self._norm_spans_groups()
        y = mamba2_step(zxbcdt, conv_state, ssm_state, p["conv_weight"], p["conv_bias"], p["A"],
                        p["dt_bias"], p["D"], None if composed else p["gate_norm_weight"], p["gate_eps"],
                        p["norm_before_gate"], p["ngroups"], p["dt_limit"])
        if composed:  # y is y * silu(z) here; norm_before_gate is False (MambaConfig checks)
            y = rms_norm_gated(y, self.norm.weight, None, self.norm.eps, self.norm.group_size)
        return linear(y, self.out_proj.weight, self.out_proj.bias).unsqueeze(1)

    def block_step(self, hidden, residual, norm_weight, norm_eps: float, cache):
        """A pre-norm block around this mixer, one token: (mixer output, hidden + residual)."""
        if self._norm_spans_groups():
            u, residual = add_rms_norm(hidden, residual, norm_weight, norm_eps)
            return self.step(u.view(-1, 1, u.shape[-1]), cache).view_as(hidden), residual
        conv_state, ssm_state = cache
        return mamba2_block_step(hidden, residual, norm_weight, norm_eps, self.in_proj.weight,
                                 self.in_proj.bias, conv_state, ssm_state, out_weight=self.out_proj.weight,
                                 out_bias=self.out_proj.bias, **self._step_params())
