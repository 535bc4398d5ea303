"""Causal multi-head attention with GQA, optional RoPE and a KV cache (names as state-spaces' MHA)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import linear


def apply_rotary(x, positions, rotary_dim: int, base: float, interleaved: bool):
    """Rotate the first rotary_dim channels of x [b,l,h,d] by position (GPT-NeoX layout by default)."""
    if rotary_dim == 0:
        return x
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=x.device,
                                            dtype=torch.float32) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq  # [b,l,rot/2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_heads_kv: int, head_dim: int,
                 qkv_proj_bias=True, out_proj_bias=True, softmax_scale=None, causal=True,
                 rotary_emb_dim=0, rotary_emb_base=10000.0, rotary_emb_interleaved=False,
                 d_conv=0, mlp_dim=0, layer_idx: int | None = None):
        super().__init__()
        if not causal:
            raise ValueError("attn_cfg.causal=False: a language model's attention must be causal")
        self.num_heads, self.num_heads_kv, self.head_dim = num_heads, num_heads_kv, head_dim
        self.softmax_scale = softmax_scale
        self.rotary_dim, self.rotary_base = rotary_emb_dim, rotary_emb_base
        self.rotary_interleaved = rotary_emb_interleaved
        self.layer_idx = layer_idx
        # in_proj output order: [q (h*d), k (kv*d), v (kv*d)]
        self.in_proj = nn.Linear(d_model, (num_heads + 2 * num_heads_kv) * head_dim,
                                 bias=qkv_proj_bias)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=out_proj_bias)

    def allocate_cache(self, batch: int, max_seqlen: int, dtype, device):
        shape = (batch, max_seqlen, self.num_heads_kv, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype,
                                                                            device=device)

    def _qkv(self, hidden, positions, decode: bool = False):
        b, length, _ = hidden.shape
        qkv = linear(hidden, self.in_proj.weight, self.in_proj.bias) if decode else self.in_proj(hidden)
        q, k, v = qkv.split([self.num_heads * self.head_dim,
                             self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        q = q.view(b, length, self.num_heads, self.head_dim)
        k = k.view(b, length, self.num_heads_kv, self.head_dim)
        v = v.view(b, length, self.num_heads_kv, self.head_dim)
        q = apply_rotary(q, positions, self.rotary_dim, self.rotary_base, self.rotary_interleaved)
        k = apply_rotary(k, positions, self.rotary_dim, self.rotary_base, self.rotary_interleaved)
        return q, k, v

    def _attend(self, q, k, v, mask=None, is_causal=False, decode: bool = False):
        rep = self.num_heads // self.num_heads_kv
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b,h,l,d]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=self.softmax_scale)
        b, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(b, length, -1)
        return linear(out, self.out_proj.weight, self.out_proj.bias) if decode else self.out_proj(out)

    def forward(self, hidden, seq_idx=None, cache=None, offset: int = 0, positions=None):
        """hidden [b,l,d]. seq_idx makes the mask block-diagonal: documents never attend across."""
        b, length, _ = hidden.shape
        if positions is None:
            positions = torch.arange(offset, offset + length, device=hidden.device).expand(b, -1)
        q, k, v = self._qkv(hidden, positions)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, offset:offset + length] = k
            v_cache[:, offset:offset + length] = v
        mask = None
        if seq_idx is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            mask = (causal & (seq_idx[:, :, None] == seq_idx[:, None, :]))[:, None]
        return self._attend(q, k, v, mask=mask, is_causal=mask is None)

    def step(self, hidden, cache, offset: int, key_mask=None, positions=None):
        """One token at position `offset`; key_mask [b, offset+1] hides padded cache slots."""
        b = hidden.shape[0]
        if positions is None:
            positions = torch.full((b, 1), offset, device=hidden.device)
        q, k, v = self._qkv(hidden, positions, decode=True)
        k_cache, v_cache = cache
        k_cache[:, offset] = k[:, 0]
        v_cache[:, offset] = v[:, 0]
        mask = None if key_mask is None else key_mask[:, None, None, :offset + 1]
        return self._attend(q, k_cache[:, :offset + 1], v_cache[:, :offset + 1], mask=mask, decode=True)
