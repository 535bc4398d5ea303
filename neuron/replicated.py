"""Mamba-2 with one B/C group (every state-spaces Mamba-2) under tensor parallelism.

Each rank keeps its own heads but computes B and C whole (mamba/model/tp_plan.py: the B/C rows of
in_proj and the B/C conv channels are replicated). Those replicated weights live in parameters
of their own, which NxD counts once in the gradient norm, and their gradients (each rank's
share of the sum) are all-reduced over the tensor-parallel group as they arrive. The gated norm
spans all d_inner channels, so its sum of squares is summed across ranks (all-reduced forward
and backward). State dicts keep the native names: in_proj.weight is this rank's
[z_r | x_r | B | C | dt_r], conv1d.weight its [x_r | B | C] channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _tp():
    from neuronx_distributed.parallel_layers import mappings, parallel_state

    return mappings, parallel_state


def all_reduce_tp(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group, out of place (gloo or XLA)."""
    from neuron.runtime import CPU, mode

    _, ps = _tp()
    if mode() == CPU:
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=ps.get_tensor_model_parallel_group())
        return out
    import torch_xla.core.xla_model as xm

    return xm.all_reduce(xm.REDUCE_SUM, tensor, groups=ps.get_tensor_model_parallel_replica_groups())


def sum_gradients_over_ranks(param: nn.Parameter) -> nn.Parameter:
    param.register_hook(all_reduce_tp)
    return param


class _ComposedWeights(nn.Module):
    """Presents `weight` / `bias` (this rank's native piece) in state dicts, stored as two parts."""

    def __init__(self):
        super().__init__()
        self._register_state_dict_hook(_compose_state)
        self._register_load_state_dict_pre_hook(self._split_state)

    def _split_state(self, state, prefix, *args):
        for name in ("weight", "bias"):
            if prefix + name in state:
                whole = state.pop(prefix + name)
                for part, piece in zip(self.parts(name), whole.split(self.sizes(name), dim=0), strict=True):
                    state[prefix + part] = piece


def _compose_state(module, state, prefix, local_metadata):
    for name in ("weight", "bias"):
        keys = [prefix + part for part in module.parts(name)]
        if all(k in state for k in keys):
            state[prefix + name] = module.compose(name, [state.pop(k) for k in keys])


class OneGroupInProj(_ComposedWeights):
    """in_proj: NxD ColumnParallelLinear for z, x, dt (split by heads) + a replicated B/C linear."""

    def __init__(self, column_cls, d_model: int, d_inner: int, nheads: int, bc_rows: int, bias: bool,
                 tp: int, dtype):
        super().__init__()
        self.local = (d_inner // tp, d_inner // tp, nheads // tp)
        self.zxdt = column_cls(d_model, 2 * d_inner + nheads, bias=bias, gather_output=False, dtype=dtype)
        self.bc = nn.Linear(d_model, bc_rows, bias=bias, dtype=dtype)
        sum_gradients_over_ranks(self.bc.weight)
        if bias:
            sum_gradients_over_ranks(self.bc.bias)

    def parts(self, name):
        return [f"zxdt.{name}", f"bc.{name}"]

    def sizes(self, name):
        z, x, dt = self.local
        return [z, x, self.bc.out_features, dt]

    def compose(self, name, tensors):  # [z|x|dt] + [B|C] -> [z|x|B|C|dt]
        z, x, dt = tensors[0].split(list(self.local), dim=0)
        return torch.cat([z, x, tensors[1], dt], dim=0)

    def _split_state(self, state, prefix, *args):
        for name in ("weight", "bias"):
            if prefix + name in state:
                z, x, bc, dt = state.pop(prefix + name).split(self.sizes(name), dim=0)
                state[prefix + f"zxdt.{name}"] = torch.cat([z, x, dt], dim=0)
                state[prefix + f"bc.{name}"] = bc

    def forward(self, hidden):
        z, x, dt = self.zxdt(hidden).split(list(self.local), dim=-1)
        mappings, _ = _tp()
        # every rank's B/C output feeds only its own heads: its input gradient is summed over ranks
        bc = F.linear(mappings.copy_to_tensor_model_parallel_region(hidden), self.bc.weight, self.bc.bias)
        return torch.cat([z, x, bc, dt], dim=-1)


class OneGroupConv(_ComposedWeights):
    """The depthwise conv over [x_r | B | C]: this rank's x channels + replicated B/C channels."""

    def __init__(self, x_channels: int, bc_channels: int, kernel: int, bias: bool, dtype):
        super().__init__()
        self.x_weight = nn.Parameter(torch.empty(x_channels, 1, kernel, dtype=dtype))
        self.bc_weight = sum_gradients_over_ranks(nn.Parameter(torch.empty(bc_channels, 1, kernel,
                                                                           dtype=dtype)))
        self.x_bias = self.bc_bias = None
        if bias:
            self.x_bias = nn.Parameter(torch.empty(x_channels, dtype=dtype))
            self.bc_bias = sum_gradients_over_ranks(nn.Parameter(torch.empty(bc_channels, dtype=dtype)))

    def parts(self, name):
        return [f"x_{name}", f"bc_{name}"]

    def sizes(self, name):
        return [self.x_weight.shape[0], self.bc_weight.shape[0]]

    def compose(self, name, tensors):
        return torch.cat(tensors, dim=0)

    @property
    def weight(self):  # what the mixer hands to the conv kernel
        return torch.cat([self.x_weight, self.bc_weight], dim=0)

    @property
    def bias(self):
        return None if self.x_bias is None else torch.cat([self.x_bias, self.bc_bias], dim=0)


class CrossRankGatedRMSNorm(nn.Module):
    """rmsnorm(x * silu(z)) * weight over all d_inner channels, this rank holding d_inner/tp of them."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, norm_before_gate: bool, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(local_dim, dtype=dtype))
        self.full_dim, self.eps, self.norm_before_gate = full_dim, eps, norm_before_gate
        self.group_size = full_dim

    def forward(self, x, z=None):
        mappings, _ = _tp()
        dtype, xf = x.dtype, x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        squares = xf.pow(2).sum(-1, keepdim=True)
        # summed over ranks forward, and backward (every rank's output depends on every rank's sum)
        squares = mappings.reduce_from_tensor_model_parallel_region(
            mappings.copy_to_tensor_model_parallel_region(squares))
        y = xf * torch.rsqrt(squares / self.full_dim + self.eps) * self.weight.float()
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.float())
        return y.to(dtype)
