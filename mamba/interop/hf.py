"""Hugging Face transformers Mamba / Mamba2 folders <-> native form.

HF names equal ours except `backbone.embeddings` (ours: `backbone.embedding`). HF configs carry
the padded vocabulary as `vocab_size`; on export we also store our full config under
`mamba_recipe_config`, so ours -> HF -> ours gives back the exact config.

Mamba-2's gated RMSNorm with n_groups > 1 is read per group from every folder, whichever
transformers saved it: that is how such models are trained (state-spaces' mamba_ssm, NVIDIA,
transformers >= 5, and transformers 4.x's own CUDA training path, mamba_split_conv1d_scan_combined
with ngroups; Mamba-Codestral-7B). Only transformers 4.x's pure-torch path and its CUDA inference
path normalise across all d_inner channels; `gated_norm="across-channels"` reproduces a model
fine-tuned there. A folder we exported keeps its own choice (the config under mamba_recipe_config).
"""

from __future__ import annotations

import json
import math
from importlib import metadata
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
GATED_NORMS = ("per-group", "across-channels")


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


def transformers_major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def with_gated_norm(config: MambaConfig, across: bool) -> MambaConfig:
    """The config with ssm_cfg.norm_across_channels set (left out when False, the default)."""
    ssm = {k: v for k, v in config.ssm_cfg.items() if k != "norm_across_channels"}
    if across:
        ssm["norm_across_channels"] = True
    return MambaConfig.from_dict({**config.to_dict(), "ssm_cfg": ssm})


def mamba2_ngroups(config: MambaConfig) -> int:
    """ngroups of the Mamba-2 layers, 0 when there are none."""
    return config.ssm_options(MAMBA2)["ngroups"] if MAMBA2 in config.layer_kinds() else 0


def gated_norm_note(config: MambaConfig, where: str, how: str) -> list[str]:
    """The line telling the user which gated norm a converted Mamba-2 (n_groups > 1) computes, and
    `how` it was chosen; none for n_groups <= 1, where the two forms agree."""
    ngroups = mamba2_ngroups(config)
    if ngroups <= 1:
        return []
    if config.ssm_options(MAMBA2)["norm_across_channels"]:
        return [f"note: {where}: Mamba-2's gated RMSNorm (n_groups={ngroups}) converted across all "
                f"channels (transformers < 5's torch path; ssm_cfg.norm_across_channels=true), {how}"]
    return [f"note: {where}: Mamba-2's gated RMSNorm (n_groups={ngroups}) converted per group "
            f"(state-spaces, NVIDIA, transformers >= 5 and transformers 4.x's CUDA training path), {how}. "
            f"Pass --gated-norm {GATED_NORMS[1]} only for a model trained or fine-tuned with "
            f"transformers < 5's torch path"]


def config_from_hf(values: dict, where: str, gated_norm: str | None = None
                   ) -> tuple[MambaConfig, list[str]]:
    """Our config for a HF config.json, and the note saying which gated norm it computes: per group
    unless `gated_norm` says otherwise or the folder is our own export (its recorded choice)."""
    config = _config_from_hf(values, where)
    if gated_norm is not None:
        how = f"as --gated-norm {gated_norm} asks"
        config = with_gated_norm(config, gated_norm == GATED_NORMS[1])
    elif isinstance(values.get(RECIPE_KEY), dict):
        how = f"as its {RECIPE_KEY} records"
    else:
        version = values.get("transformers_version")
        how = (f"the default for every source (saved by transformers {version})" if version
               else "the default for every source")
    return config, gated_norm_note(config, where, how)


def _config_from_hf(values: dict, where: str) -> MambaConfig:
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


def read_hf(src: Path, gated_norm: str | None = None) -> Checkpoint:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{config_file}: not found; a Hugging Face folder has config.json and "
                           f"model.safetensors (or pytorch_model.bin)")
    try:
        values = json.loads(config_file.read_text())
        config, notes = config_from_hf(values, str(config_file), gated_norm)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConvertError):
            raise
        raise ConvertError(f"{config_file}: not a usable Hugging Face Mamba config "
                           f"({type(exc).__name__}: {exc})") from None
    keys, get, where = weight_source(src)
    renamed = {k.replace("backbone.embeddings.", "backbone.embedding."): k for k in keys}
    tensors = merge_split_in_proj(list(renamed), lambda k: get(renamed[k]))
    return Checkpoint(config, tensors, where, tokenizer_dir=src, notes=notes)


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


def installed_transformers() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def gated_norm_warning(config: MambaConfig, target: str | None) -> str | None:
    """What to tell a user exporting to transformers `target` (None: unknown) when that version
    would normalise Mamba-2's gated RMSNorm differently from this model."""
    ngroups = mamba2_ngroups(config)
    if ngroups <= 1:
        return None
    across = config.ssm_options(MAMBA2)["norm_across_channels"]
    ours = ("across all channels (as transformers < 5)" if across
            else "per group (as state-spaces, NVIDIA and transformers >= 5)")
    major = transformers_major(target)
    if major is None:
        return (f"warning: this Mamba-2 model (n_groups={ngroups}) normalises its gated RMSNorm "
                f"{ours}; transformers < 5 normalises across all channels and >= 5 per group, so load "
                f"it with transformers {'< 5' if across else '>= 5'} (pass --transformers-version to "
                f"check a target)")
    if (major < 5) == across:
        return None
    theirs = "across all channels" if major < 5 else "per group"
    return (f"warning: transformers {target} normalises Mamba-2's gated RMSNorm {theirs}, but this "
            f"model (n_groups={ngroups}) normalises it {ours}: transformers {target} will compute "
            f"different logits; load it with transformers {'< 5' if across else '>= 5'}")


def write_hf(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None,
             target_version: str | None = None) -> None:
    """target_version: the transformers that will load it (None: the installed one, if any)."""
    values = hf_config(ckpt.config)
    values[RECIPE_KEY] = ckpt.config.to_dict()
    warning = gated_norm_warning(ckpt.config, target_version or installed_transformers())
    if warning:
        ckpt.notes.append(warning)
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    shapes = expected_shapes(ckpt.config)
    rename = lambda k: k.replace("backbone.embedding.", "backbone.embeddings.")  # noqa: E731
    write_safetensors(folder / "model.safetensors",
                      ((rename(k), v) for k, v in stream_tensors(ckpt, dtype)),
                      {rename(k): s for k, s in shapes.items()}, metadata={"format": "pt"})
