"""Hugging Face transformers Mamba / Mamba2 folders <-> native form.

HF names equal ours except `backbone.embeddings` (ours: `backbone.embedding`). HF configs carry
the padded vocabulary as `vocab_size`; on export we also store our full config under
`mamba_recipe_config`, so ours -> HF -> ours gives back the exact config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mamba.interop.tensors import (
    Checkpoint,
    ConvertError,
    expected_shapes,
    merge_split_in_proj,
    stream_tensors,
    weight_source,
    write_safetensors,
)
from mamba.model.config import MAMBA1, MAMBA2, MambaConfig

RECIPE_KEY = "mamba_recipe_config"


# transformers' class defaults: a config.json may omit any field left at its default
HF_DEFAULTS = {
    "mamba": dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32,
                  layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, use_bias=False,
                  use_conv_bias=True, residual_in_fp32=True, time_step_rank="auto",
                  tie_word_embeddings=True),
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4,
                   n_groups=8, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                   time_step_limit=(0.0, math.inf), chunk_size=256,
                   tie_word_embeddings=False),
}


def config_from_hf(values: dict, where: str) -> MambaConfig:
    if isinstance(values.get(RECIPE_KEY), dict):
        return MambaConfig.from_dict(values[RECIPE_KEY])
    kind = values.get("model_type")
    if kind not in HF_DEFAULTS:
        raise ConvertError(f"{where}: model_type={kind!r}; expected 'mamba' or 'mamba2' (other "
                           f"formats: --from state-spaces / native / megatron / composer)")
    v = {**HF_DEFAULTS[kind], **{k: x for k, x in values.items() if x is not None}}
    common = dict(d_model=v["hidden_size"], n_layer=v["num_hidden_layers"],
                  vocab_size=v["vocab_size"], pad_vocab_size_multiple=1,
                  residual_in_fp32=v["residual_in_fp32"], norm_epsilon=v["layer_norm_epsilon"],
                  tie_embeddings=v["tie_word_embeddings"])
    if kind == "mamba":
        ssm = dict(layer="Mamba1", d_state=v["state_size"], d_conv=v["conv_kernel"],
                   expand=v["expand"], dt_rank=v["time_step_rank"], conv_bias=v["use_conv_bias"],
                   bias=v["use_bias"])
        return MambaConfig(ssm_cfg=ssm, **common)
    d_inner = v["num_heads"] * v["head_dim"]
    if d_inner != v["expand"] * v["hidden_size"]:
        raise ConvertError(f"{where}: num_heads*head_dim={d_inner} != expand*hidden_size="
                           f"{v['expand'] * v['hidden_size']}")
    limit = v["time_step_limit"]
    ssm = dict(layer="Mamba2", d_state=v["state_size"], d_conv=v["conv_kernel"], expand=v["expand"],
               headdim=v["head_dim"], ngroups=v["n_groups"], chunk_size=v["chunk_size"],
               conv_bias=v["use_conv_bias"], bias=v["use_bias"],
               dt_limit=[float(limit[0]), float(limit[1])])  # transformers ignores rms_norm: always gated
    return MambaConfig(ssm_cfg=ssm, **common)


def read_hf(src: Path) -> Checkpoint:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{config_file}: not found; a Hugging Face folder has config.json and "
                           f"model.safetensors (or pytorch_model.bin)")
    try:
        values = json.loads(config_file.read_text())
        config = config_from_hf(values, str(config_file))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConvertError):
            raise
        raise ConvertError(f"{config_file}: not a usable Hugging Face Mamba config "
                           f"({type(exc).__name__}: {exc})") from None
    keys, get, where = weight_source(src)
    renamed = {k.replace("backbone.embeddings.", "backbone.embedding."): k for k in keys}
    tensors = merge_split_in_proj(list(renamed), lambda k: get(renamed[k]))
    return Checkpoint(config, tensors, where, tokenizer_dir=src)


def hf_config(config: MambaConfig) -> dict:
    """The transformers config dict, or ConvertError saying why this model has no HF class."""
    kinds = set(config.layer_kinds())
    if kinds - {MAMBA1, MAMBA2} or len(kinds) > 1 or (config.layer_pattern is None
                                                      and config.d_intermediate > 0):
        raise ConvertError("hybrid model (attention / MLP layers or mixed Mamba kinds): "
                           "transformers has no class for it")
    if not config.rms_norm:
        raise ConvertError("rms_norm=False: transformers' Mamba classes use RMSNorm only")
    kind = kinds.pop()
    opts = config.ssm_options(kind)
    common = dict(hidden_size=config.d_model, num_hidden_layers=config.n_layer,
                  vocab_size=config.padded_vocab_size, state_size=opts["d_state"],
                  expand=opts["expand"], conv_kernel=opts["d_conv"], use_bias=opts["bias"],
                  use_conv_bias=opts["conv_bias"], residual_in_fp32=config.residual_in_fp32,
                  layer_norm_epsilon=config.norm_epsilon,
                  tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
                  initializer_range=config.initializer_range, time_step_min=opts["dt_min"],
                  time_step_max=opts["dt_max"], time_step_floor=opts["dt_init_floor"])
    if kind == MAMBA1:
        return dict(architectures=["MambaForCausalLM"], model_type="mamba",
                    time_step_rank=opts["dt_rank"], time_step_scale=opts["dt_scale"],
                    time_step_init_scheme=opts["dt_init"], **common)
    bad = [f"{k}={opts[k]!r}" for k, want in (("D_has_hdim", False), ("rmsnorm", True),
                                             ("norm_before_gate", False)) if opts[k] != want]
    if bad:
        raise ConvertError(f"Mamba-2 with {', '.join(bad)}: transformers' Mamba2 has no such option")
    d_inner = opts["expand"] * config.d_model
    return dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                num_heads=d_inner // opts["headdim"], head_dim=opts["headdim"],
                n_groups=opts["ngroups"], chunk_size=opts["chunk_size"], rms_norm=True,
                time_step_limit=list(opts["dt_limit"]), **common)


def write_hf(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    values = hf_config(ckpt.config)
    values[RECIPE_KEY] = ckpt.config.to_dict()
    if values["model_type"] == "mamba2" and values["n_groups"] > 1:
        ckpt.notes.append("note: n_groups > 1: transformers' CUDA kernel path normalises per group "
                          "as we do, but its pure-torch (CPU) path does not, so CPU logits differ")
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    shapes = expected_shapes(ckpt.config)
    rename = lambda k: k.replace("backbone.embedding.", "backbone.embeddings.")  # noqa: E731
    write_safetensors(folder / "model.safetensors",
                      ((rename(k), v) for k, v in stream_tensors(ckpt, dtype)),
                      {rename(k): s for k, s in shapes.items()}, metadata={"format": "pt"})
