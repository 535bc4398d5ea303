"""Model configuration: state-spaces' MambaConfig fields plus a Megatron-style layer pattern."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Layer pattern symbols (Megatron's hybrid notation, plus one for Mamba-1).
MAMBA2, MAMBA1, ATTENTION, MLP = "M", "m", "*", "-"
PATTERN_SYMBOLS = {MAMBA2: "Mamba-2", MAMBA1: "Mamba-1", ATTENTION: "attention", MLP: "MLP"}

MAMBA1_DEFAULTS: dict[str, Any] = dict(
    d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init="random",
    dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False)
MAMBA2_DEFAULTS: dict[str, Any] = dict(
    d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, A_init_range=(1, 16),
    D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001, dt_max=0.1,
    dt_init_floor=1e-4, dt_limit=(0.0, math.inf), bias=False, conv_bias=True, chunk_size=256,
    norm_across_channels=False)
ATTENTION_DEFAULTS: dict[str, Any] = dict(
    num_heads=None, num_heads_kv=None, head_dim=None, qkv_proj_bias=True, out_proj_bias=True,
    softmax_scale=None, causal=True, rotary_emb_dim=0, rotary_emb_base=10000.0,
    rotary_emb_interleaved=False, d_conv=0, mlp_dim=0)
MLP_ACTIVATIONS = ("swiglu", "gelu", "relu2")


@dataclass
class MambaConfig:
    """Field names and defaults follow state-spaces/mamba's MambaConfig, so its config.json loads.

    Additions: `layer_pattern` (e.g. "M-M*-", one symbol per layer: M Mamba-2, m Mamba-1,
    * attention, - MLP) as an alternative to ssm_cfg["layer"] + attn_layer_idx; `mlp_activation`;
    `norm_epsilon`; `initializer_range`; ssm_cfg["norm_across_channels"]: Mamba-2's gated
    RMSNorm over all d_inner channels, as transformers < 5 computes it, instead of per group of
    d_inner/ngroups channels (state-spaces, NVIDIA, transformers >= 5; the default). The two
    differ only when ngroups > 1.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for compatibility; has no effect here
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    layer_pattern: str | None = None
    mlp_activation: str = "swiglu"
    norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.ssm_cfg = dict(self.ssm_cfg or {})
        self.attn_cfg = dict(self.attn_cfg or {})
        self.attn_layer_idx = list(self.attn_layer_idx or [])
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else -(-self.vocab_size // m) * m

    @property
    def ssm_layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    def layer_kinds(self) -> list[str]:
        """One pattern symbol per layer."""
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        ssm = MAMBA2 if self.ssm_layer == "Mamba2" else MAMBA1
        attn = set(self.attn_layer_idx)
        return [ATTENTION if i in attn else ssm for i in range(self.n_layer)]

    def ssm_options(self, kind: str) -> dict[str, Any]:
        defaults = MAMBA2_DEFAULTS if kind == MAMBA2 else MAMBA1_DEFAULTS
        opts = dict(defaults)
        # one ssm_cfg serves both kinds in a hybrid: each takes the keys it knows
        opts.update({k: v for k, v in self.ssm_cfg.items() if k in defaults})
        if "dt_limit" in opts:
            opts["dt_limit"] = tuple(float(v) for v in opts["dt_limit"])
        return opts

    def attn_options(self) -> dict[str, Any]:
        opts = dict(ATTENTION_DEFAULTS)
        opts.update(self.attn_cfg)
        opts["num_heads"] = opts["num_heads"] or max(1, self.d_model // 64)
        opts["num_heads_kv"] = opts["num_heads_kv"] or opts["num_heads"]
        opts["head_dim"] = opts["head_dim"] or self.d_model // opts["num_heads"]
        return opts

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field_name: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"MambaConfig.{field_name}={value!r}: {rule}")

        for name in ("d_model", "n_layer", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, getattr(self, name), "must be a positive integer")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise bad("mlp_activation", self.mlp_activation, f"must be one of {MLP_ACTIVATIONS}")
        if self.layer_pattern is not None:
            unknown = sorted({s for s in self.layer_pattern if s not in PATTERN_SYMBOLS})
            if unknown:
                raise bad("layer_pattern", self.layer_pattern,
                          f"unknown symbol(s) {unknown}; use " +
                          ", ".join(f"'{k}' {v}" for k, v in PATTERN_SYMBOLS.items()))
            if len(self.layer_pattern) != self.n_layer:
                raise bad("n_layer", self.n_layer,
                          f"must equal len(layer_pattern)={len(self.layer_pattern)}")
            if self.attn_layer_idx:
                raise bad("attn_layer_idx", self.attn_layer_idx,
                          "give either layer_pattern or attn_layer_idx, not both")
            if MLP in self.layer_pattern and self.d_intermediate <= 0:
                raise bad("d_intermediate", self.d_intermediate,
                          "must be > 0 when layer_pattern has MLP layers ('-')")
        else:
            if self.ssm_layer not in ("Mamba1", "Mamba2"):
                raise bad("ssm_cfg.layer", self.ssm_layer, "must be 'Mamba1' or 'Mamba2'")
            out_of_range = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
            if out_of_range:
                raise bad("attn_layer_idx", self.attn_layer_idx,
                          f"indices {out_of_range} are outside 0..n_layer-1={self.n_layer - 1}")
        kinds = set(self.layer_kinds())
        allowed = set(MAMBA1_DEFAULTS) | set(MAMBA2_DEFAULTS) | {"layer"}
        unknown = sorted(set(self.ssm_cfg) - allowed)
        if unknown:
            raise bad("ssm_cfg", self.ssm_cfg, f"unknown key(s) {unknown}")
        for kind in kinds & {MAMBA1, MAMBA2}:
            opts = self.ssm_options(kind)
            d_inner = opts["expand"] * self.d_model
            if kind == MAMBA2:
                if d_inner % opts["headdim"]:
                    raise bad("ssm_cfg.headdim", opts["headdim"],
                              f"must divide d_inner = expand*d_model = {d_inner}")
                nheads = d_inner // opts["headdim"]
                if nheads % opts["ngroups"]:
                    raise bad("ssm_cfg.ngroups", opts["ngroups"],
                              f"must divide the number of heads d_inner/headdim = {nheads}")
                if opts["chunk_size"] <= 0:
                    raise bad("ssm_cfg.chunk_size", opts["chunk_size"], "must be positive")
                if not isinstance(opts["norm_across_channels"], bool):
                    raise bad("ssm_cfg.norm_across_channels", opts["norm_across_channels"],
                              "must be true or false")
                if opts["norm_across_channels"] and (opts["norm_before_gate"] or not opts["rmsnorm"]):
                    raise bad("ssm_cfg.norm_across_channels", True,
                              "reproduces transformers < 5, whose Mamba-2 has rmsnorm=True and "
                              "norm_before_gate=False; it cannot be combined with "
                              f"rmsnorm={opts['rmsnorm']}, norm_before_gate={opts['norm_before_gate']}")
        if ATTENTION in kinds:
            unknown = sorted(set(self.attn_cfg) - set(ATTENTION_DEFAULTS))
            if unknown:
                raise bad("attn_cfg", self.attn_cfg, f"unknown key(s) {unknown}")
            opts = self.attn_options()
            if opts["num_heads"] % opts["num_heads_kv"]:
                raise bad("attn_cfg.num_heads_kv", opts["num_heads_kv"],
                          f"must divide num_heads={opts['num_heads']}")
            if not self.attn_cfg.get("head_dim") and self.d_model % opts["num_heads"]:
                raise bad("attn_cfg.num_heads", opts["num_heads"],
                          f"must divide d_model={self.d_model} (or set head_dim)")
            if opts["rotary_emb_dim"] % 2 or opts["rotary_emb_dim"] > opts["head_dim"]:
                raise bad("attn_cfg.rotary_emb_dim", opts["rotary_emb_dim"],
                          f"must be even and at most head_dim={opts['head_dim']}")
            if opts["d_conv"] or opts["mlp_dim"]:
                raise bad("attn_cfg", self.attn_cfg,
                          "d_conv and mlp_dim inside attention layers are not supported; use 0")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for cfg in (out["ssm_cfg"], out["attn_cfg"]):
            for k, v in cfg.items():
                if isinstance(v, tuple):
                    cfg[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MambaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)
