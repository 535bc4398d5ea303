"""Feed-forward layers: SwiGLU (state-spaces' GatedMLP), GELU and squared ReLU (Megatron)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from kernels import linear


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", bias: bool = False,
                 multiple_of: int = 128, layer_idx: int | None = None):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":  # GatedMLP rounds the width up, as state-spaces does
            hidden = -(-hidden // multiple_of) * multiple_of
        self.hidden = hidden
        gated = activation == "swiglu"
        self.fc1 = nn.Linear(d_model, 2 * hidden if gated else hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)
        self.layer_idx = layer_idx

    def forward(self, x, seq_idx=None, cache=None, decode: bool = False):
        h = linear(x, self.fc1.weight, self.fc1.bias) if decode else self.fc1(x)
        if self.activation == "swiglu":
            y, gate = h.chunk(2, dim=-1)
            h = y * F.silu(gate)
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:  # relu2
            h = F.relu(h).square()
        return linear(h, self.fc2.weight, self.fc2.bias) if decode else self.fc2(h)
