"""MambaLMHeadModel: embedding -> blocks (pre-norm, fp32 residual) -> final norm -> LM head.

Module and parameter names are those of state-spaces' MambaLMHeadModel, so its checkpoints load
unchanged: backbone.embedding, backbone.layers.{i}.{norm,mixer,norm2,mlp}, backbone.norm_f, lm_head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kernels import add_rms_norm, linear
from mamba.model.attention import Attention
from mamba.model.config import ATTENTION, MAMBA1, MAMBA2, MLP, MambaConfig
from mamba.model.init import init_module
from mamba.model.loss import linear_cross_entropy
from mamba.model.mamba1 import Mamba1
from mamba.model.mamba2 import Mamba2
from mamba.model.mlp import MLP as MLPLayer


class _RMSNormFunction(torch.autograd.Function):
    """rmsnorm(x) * weight keeping only x (the residual stream, alive anyway) and 1/rms for
    backward; composed from torch ops, autograd would also keep the normalised copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_f = grad.to(rstd.dtype)
        grad_weight = (grad_f * normed).reshape(-1, x.shape[-1]).sum(0)
        g = grad_f * weight.to(rstd.dtype)
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
                * self.weight.float()).to(x.dtype)


def make_norm(config: MambaConfig) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon)


def make_mixer(kind: str, config: MambaConfig, layer_idx: int) -> nn.Module:
    if kind == MAMBA2:
        return Mamba2(config.d_model, layer_idx=layer_idx, **config.ssm_options(MAMBA2))
    if kind == MAMBA1:
        return Mamba1(config.d_model, layer_idx=layer_idx, **config.ssm_options(MAMBA1))
    if kind == ATTENTION:
        return Attention(config.d_model, layer_idx=layer_idx, **config.attn_options())
    return MLPLayer(config.d_model, config.d_intermediate, config.mlp_activation,
                    layer_idx=layer_idx)


@dataclass
class InferenceCache:
    """Recurrent state for generation: (conv, ssm) per Mamba layer, (k, v) per attention layer.

    Memory per sequence is constant for Mamba layers; attention layers hold max_seqlen keys.
    `key_mask` [b, max_seqlen] marks real (not left-padding) positions for attention layers.
    """

    max_batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    states: dict = field(default_factory=dict)
    key_mask: torch.Tensor | None = None


def _decoding(cache: InferenceCache | None) -> bool:
    """Past the prefill: a few rows per matmul, so linears take the decode path."""
    return cache is not None and cache.seqlen_offset > 0


class Block(nn.Module):
    """norm -> mixer (-> norm2 -> mlp when d_intermediate > 0 in state-spaces' hybrid form)."""

    def __init__(self, kind: str, config: MambaConfig, layer_idx: int, with_mlp: bool):
        super().__init__()
        self.kind, self.layer_idx = kind, layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config)
        self.mixer = make_mixer(kind, config, layer_idx)
        if with_mlp:
            self.norm2 = make_norm(config)
            self.mlp = MLPLayer(config.d_model, config.d_intermediate, config.mlp_activation,
                                layer_idx=layer_idx)
        else:
            self.norm2 = self.mlp = None

    def _add(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return residual.float() if self.residual_in_fp32 else residual

    def _add_norm(self, norm, hidden, residual, decoding: bool):
        if decoding and isinstance(norm, RMSNorm) and hidden.dtype == torch.float32:
            return add_rms_norm(hidden, residual, norm.weight, norm.eps)  # one fused call on CPU
        residual = self._add(hidden, residual)
        return norm(residual.to(norm.weight.dtype)), residual

    def forward(self, hidden, residual, seq_idx=None, cache: InferenceCache | None = None):
        decoding = _decoding(cache)
        if (decoding and self.kind in (MAMBA1, MAMBA2) and self.mlp is None and isinstance(self.norm, RMSNorm)
                and hidden.shape[1] == 1 and hidden.dtype == torch.float32):
            return self.mixer.block_step(hidden, residual, self.norm.weight, self.norm.eps,
                                         cache.states[self.layer_idx])
        hidden, residual = self._add_norm(self.norm, hidden, residual, decoding)
        hidden = self._mix(hidden, seq_idx, cache)
        if self.mlp is not None:
            hidden, residual = self._add_norm(self.norm2, hidden, residual, decoding)
            hidden = self.mlp(hidden, decode=decoding)
        return hidden, residual

    def _mix(self, hidden, seq_idx, cache):
        if cache is None:
            return self.mixer(hidden, seq_idx=seq_idx)
        if self.kind == MLP:
            return self.mixer(hidden, decode=_decoding(cache))
        state = cache.states[self.layer_idx]
        offset = cache.seqlen_offset
        positions = None
        if cache.key_mask is not None:  # left padding: positions count real tokens only
            real = cache.key_mask[:, :offset + hidden.shape[1]].long()
            positions = (real.cumsum(-1) - 1).clamp(min=0)[:, offset:]
        if offset == 0:
            if self.kind == ATTENTION:
                return self._attn_prefill(hidden, seq_idx, state, cache, positions)
            return self.mixer(hidden, seq_idx=seq_idx, cache=state)
        outs = []
        for t in range(hidden.shape[1]):  # continue token by token
            token = hidden[:, t:t + 1]
            if self.kind == ATTENTION:
                pos = None if positions is None else positions[:, t:t + 1]
                outs.append(self.mixer.step(token, state, offset + t, cache.key_mask, pos))
            else:
                outs.append(self.mixer.step(token, state))
        return torch.cat(outs, dim=1)

    def _attn_prefill(self, hidden, seq_idx, state, cache, positions):
        if cache.key_mask is None:
            return self.mixer(hidden, seq_idx=seq_idx, cache=state, positions=positions)
        # Left-padded prompts: hide padded keys; padded queries attend to themselves only.
        length = hidden.shape[1]
        q, k, v = self.mixer._qkv(hidden, positions)
        state[0][:, :length], state[1][:, :length] = k, v
        real = cache.key_mask[:, :length]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        mask = causal & real[:, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=hidden.device)
        return self.mixer._attend(q, k, v, mask=mask[:, None])


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kinds = config.layer_kinds()
        with_mlp = config.layer_pattern is None and config.d_intermediate > 0
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.backbone.layers = nn.ModuleList(
            [Block(kind, config, i, with_mlp) for i, kind in enumerate(kinds)])
        self.backbone.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head._tied = config.tie_embeddings
        n_residuals = 2 if (config.layer_pattern is None and config.d_intermediate > 0) else 1
        for name, module in self.named_modules():
            if name.endswith((".out_proj", ".fc2")):
                module._residual_scale = math.sqrt(n_residuals * config.n_layer)
        self.tie_weights()
        for module in self.modules():
            init_module(module, config.initializer_range)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def init_module(self, module: nn.Module) -> None:
        """Initialise `module`'s own parameters (FSDP's param_init_fn for meta-device init)."""
        init_module(module, self.config.initializer_range)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input_ids, seq_idx=None, inference_params: InferenceCache | None = None,
                num_last_tokens: int = 0, labels=None):
        """input_ids [b,l] -> logits [b,l,padded_vocab]. seq_idx [b,l] separates packed documents.

        With labels [b,l] (-100 where there is no target): the mean cross entropy over the real
        vocabulary (padding rows excluded) as an LMLoss, computed in chunks so that the
        [b*l, vocab] logits never exist (mamba.model.loss)."""
        hidden = self.backbone.embedding(input_ids)
        residual = None
        for layer in self.backbone.layers:
            hidden, residual = layer(hidden, residual, seq_idx=seq_idx, cache=inference_params)
        norm_f = self.backbone.norm_f
        if _decoding(inference_params) and isinstance(norm_f, RMSNorm) and hidden.dtype == torch.float32:
            hidden, residual = add_rms_norm(hidden, residual, norm_f.weight, norm_f.eps)
        else:
            residual = hidden + residual if residual is not None else hidden
            hidden = norm_f(residual.to(norm_f.weight.dtype))
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        if labels is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, labels, bias=self.lm_head.bias,
                                        vocab_size=self.config.vocab_size)
        if inference_params is not None:  # generation: a few rows, no autograd
            return linear(hidden, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(hidden)

    # ---- inference -----------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None,
                                 device=None) -> InferenceCache:
        param = self.backbone.embedding.weight
        dtype, device = dtype or param.dtype, device or param.device
        cache = InferenceCache(batch_size, max_seqlen)
        for layer in self.backbone.layers:
            if layer.kind in (MAMBA1, MAMBA2):
                cache.states[layer.layer_idx] = layer.mixer.allocate_cache(batch_size, dtype, device)
            elif layer.kind == ATTENTION:
                cache.states[layer.layer_idx] = layer.mixer.allocate_cache(
                    batch_size, max_seqlen, dtype, device)
        return cache

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, attention_mask=None,
                 generator: torch.Generator | None = None, streamer=None):
        from mamba.model.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_token_id=eos_token_id, attention_mask=attention_mask,
                        generator=generator, streamer=streamer)

    # ---- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> MambaLMHeadModel:
        from mamba.model.io import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        from mamba.model.io import save_pretrained

        save_pretrained(self, path, safe_serialization=safe_serialization)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters flagged `_no_weight_decay` (A_log, D, dt_bias), plus norms and biases."""
    names = set()
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.dim() < 2:
            names.add(name)
    return names


