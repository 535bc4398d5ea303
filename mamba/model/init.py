"""Parameter initialisation, module by module (state-spaces' scheme).

`init_module(m)` initialises only the parameters `m` owns directly, so it serves both the normal
constructor (applied to every module) and meta-device initialisation under FSDP, which calls
it module by module in either order. Modules carry what they need as attributes:
  * `_dt_init` on Mamba-1's dt_proj: uniform weight, bias = inverse softplus of a
    log-uniform dt in [dt_min, dt_max];
  * `_residual_scale` on out_proj / fc2: kaiming-uniform divided by sqrt(residuals x layers);
  * `_tied` on a tied lm_head: its weight is the embedding's and is left alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float, like: torch.Tensor):
    """Biases whose softplus is log-uniform in [dt_min, dt_max] (at least `floor`)."""
    dt = torch.exp(torch.rand(n, device=like.device) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=floor)
    return (dt + torch.log(-torch.expm1(-dt))).to(like.dtype)


@torch.no_grad()
def init_module(module: nn.Module, initializer_range: float = 0.02) -> None:
    if isinstance(module, nn.Linear):
        dt_init = getattr(module, "_dt_init", None)
        if dt_init is not None:
            std, mode, dt_min, dt_max, floor = dt_init
            if mode == "constant":
                module.weight.fill_(std)
            else:
                module.weight.uniform_(-std, std)
            module.bias.copy_(inverse_softplus_dt(module.bias.numel(), dt_min, dt_max, floor,
                                                  module.bias))
            return
        if not getattr(module, "_tied", False):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # nn.Linear's default
            scale = getattr(module, "_residual_scale", None)
            if scale:
                module.weight /= scale
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(std=initializer_range)
    elif isinstance(module, (nn.Conv1d, nn.LayerNorm)):
        module.reset_parameters()
    elif hasattr(module, "reset_parameters"):  # mixers (A_log, D, dt_bias) and RMS norms
        module.reset_parameters()
