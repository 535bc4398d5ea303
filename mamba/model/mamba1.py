"""Mamba-1 mixer (Gu & Dao 2023), parameter names as state-spaces' `Mamba`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import causal_conv1d_fn, mamba1_block_step, mamba1_mixer_step, selective_scan_fn
from kernels.conv1d import fill_conv_state
from mamba.model.init import init_module


class Mamba1(nn.Module):
    def __init__(self, d_model: int, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, layer_idx: int | None = None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        if dt_init not in ("random", "constant"):
            raise ValueError(f"ssm_cfg.dt_init={dt_init!r}: must be 'random' or 'constant'")
        # read by mamba.model.init: softplus(bias) log-uniform in [dt_min, dt_max]
        self.dt_proj._dt_init = (self.dt_rank ** -0.5 * dt_scale, dt_init, dt_min, dt_max,
                                 dt_init_floor)
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.D._no_weight_decay = True
        self.reset_parameters()
        init_module(self.dt_proj)

    def reset_parameters(self) -> None:
        """This module's own parameters (children are initialised by mamba.model.init)."""
        with torch.no_grad():
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(A).repeat(self.d_inner, 1))
            self.D.fill_(1.0)

    def allocate_cache(self, batch: int, dtype, device):
        conv = torch.zeros(batch, self.d_inner, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, dtype=torch.float32, device=device)
        return conv, ssm

    def forward(self, hidden, seq_idx=None, cache=None):
        """hidden [b,l,d_model] -> [b,l,d_model]; cache = (conv_state, ssm_state) or None."""
        xz = self.in_proj(hidden).transpose(1, 2)  # [b,2*d_inner,l]
        x, z = xz.chunk(2, dim=1)
        if cache is not None:  # the conv window decoding continues from
            fill_conv_state(cache[0], x, seq_idx)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                             activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))  # [b,l,r+2n]
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan_fn(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                              return_last_state=cache is not None, seq_idx=seq_idx)
        if cache is not None:
            y, last_state = y
            cache[1].copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def _A(self):
        """-exp(A_log) in float32; without autograd, kept while A_log is unchanged (decoding asks
        for it every token, and the exp over [d_inner, d_state] costs as much as a small matmul)."""
        if torch.is_grad_enabled():
            return -torch.exp(self.A_log.float())
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.device, self.A_log.dtype)
        cached = getattr(self, "_A_cache", None)
        if cached is None or cached[0] != key:
            cached = self._A_cache = (key, -torch.exp(self.A_log.float()))
        return cached[1]

    def _step_tensors(self) -> tuple:
        """(in_proj w, b, conv w, b, x_proj w, dt_proj w, dt bias, A, D, out_proj w, b) for decoding."""
        return (self.in_proj.weight, self.in_proj.bias, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self._A(), self.D,
                self.out_proj.weight, self.out_proj.bias)

    def step(self, hidden, cache):
        """One token: hidden [b,1,d_model]; updates cache in place."""
        return mamba1_mixer_step(hidden, *cache, *self._step_tensors()).unsqueeze(1)

    def block_step(self, hidden, residual, norm_weight, norm_eps: float, cache):
        """A pre-norm block around this mixer, one token: (mixer output, hidden + residual)."""
        w = self._step_tensors()
        return mamba1_block_step(hidden, residual, norm_weight, norm_eps, *w[:2], *cache, *w[2:])
