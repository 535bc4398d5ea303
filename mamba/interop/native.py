"""Our native folder, state-spaces folders, split-projection (Trainium) folders and Composer
checkpoints: all use state-spaces parameter names, so reading is mostly locating the tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba.interop.tensors import (
    Checkpoint,
    ConvertError,
    composer_globals,
    expected_shapes,
    load_torch,
    merge_split_in_proj,
    stream_tensors,
    weight_source,
    write_safetensors,
)
from mamba.model.config import ATTENTION, MAMBA1, MAMBA2, MambaConfig

STATE_SPACES_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                       "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                       "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")


def read_config_file(path: Path) -> MambaConfig:
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConvertError(f"{path}: config.json not found")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: invalid JSON ({exc})") from None
    if "model_type" in values:
        raise ConvertError(f"{path} is a Hugging Face config (model_type={values['model_type']!r}); "
                           f"use --from hf")
    try:
        return MambaConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ConvertError(f"{path}: {exc}") from None


def read_folder(src: Path) -> Checkpoint:
    """A native / state-spaces folder; split in_proj_{z,xBC,dt} tensors are rejoined."""
    if not src.is_dir():
        raise ConvertError(f"{src}: expected a folder with config.json and weights")
    config = read_config_file(src)
    keys, get, where = weight_source(src)
    tensors = merge_split_in_proj(keys, get)
    return Checkpoint(config, tensors, where, tokenizer_dir=src)


def read_composer(src: Path, config_path: Path | None, unsafe: bool = False) -> Checkpoint:
    """A Composer checkpoint, monolithic (.pt) or sharded (a DCP folder): state['model'] holds
    `model.`-prefixed names.
    Composer does not store our MambaConfig, so --config names a config.json (or its folder)."""
    if config_path is None:
        raise ConvertError(f"{src}: a Composer checkpoint does not record the model config; pass "
                           f"--config with the run's config.json or the init_from folder")
    config = read_config_file(config_path)
    if src.is_dir():
        if not (src / ".metadata").is_file():
            raise ConvertError(f"{src}: a sharded Composer checkpoint folder holds .metadata and "
                               f"*.distcp files; none here")
        from mamba.interop.composer_sharded import read_sharded_model_state

        state = read_sharded_model_state(src)
    else:
        blob = load_torch(src, composer_globals(), unsafe=unsafe)
        inner = blob.get("state") if isinstance(blob, dict) else None
        state = inner.get("model") if isinstance(inner, dict) else None
        if not isinstance(state, dict):
            raise ConvertError(f"{src}: not a Composer checkpoint (no state['model'])")
    prefix = "model."
    tensors = {k[len(prefix):]: (lambda v=v: v) for k, v in state.items() if k.startswith(prefix)}
    for k in state:
        if not k.startswith(prefix):
            tensors[k] = lambda v=state[k]: v  # reported as unexpected by the name check
    return Checkpoint(config, tensors, str(src))


# ---------------------------------------------------------------- writing
def state_spaces_config(config: MambaConfig) -> tuple[dict, str | None]:
    """The config as state-spaces' mamba_ssm reads it, or our full config plus the reason why
    mamba_ssm cannot load it (this recipe still can)."""
    default = MambaConfig(d_model=config.d_model, n_layer=config.n_layer,
                          vocab_size=config.vocab_size)
    values = config.to_dict()
    if values["ssm_cfg"].pop("norm_across_channels", False) and config.ssm_options(MAMBA2)["ngroups"] > 1:
        return config.to_dict(), ("ssm_cfg.norm_across_channels=true (the gated norm of transformers < 5) "
                                  "has no state-spaces equivalent")
    if config.layer_pattern is not None:
        kinds = config.layer_kinds()
        ssm = {k for k in kinds if k in (MAMBA1, MAMBA2)}
        if len(ssm) > 1 or set(kinds) - {MAMBA1, MAMBA2, ATTENTION}:
            return values, (f"layer_pattern {config.layer_pattern!r} (separate MLP layers or mixed "
                            f"Mamba-1/Mamba-2) has no state-spaces equivalent")
        values["layer_pattern"] = None
        values["attn_layer_idx"] = [i for i, k in enumerate(kinds) if k == ATTENTION]
        values["ssm_cfg"] = dict(values["ssm_cfg"],
                                 layer="Mamba2" if ssm == {MAMBA2} else "Mamba1")
        if values["d_intermediate"]:
            values["d_intermediate"] = 0  # only MLP layers ('-') use it with a layer_pattern
    if values["d_intermediate"] and config.mlp_activation != "swiglu":
        return config.to_dict(), f"mlp_activation={config.mlp_activation!r} (state-spaces has SwiGLU only)"
    for name in ("mlp_activation", "norm_epsilon", "initializer_range"):
        if name == "mlp_activation" and not values["d_intermediate"]:
            continue
        if getattr(config, name) != getattr(default, name):
            return config.to_dict(), f"{name}={getattr(config, name)!r} is not state-spaces' default"
    return {k: values[k] for k in STATE_SPACES_FIELDS}, None


def write_native(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """config.json (our MambaConfig) + model.safetensors, streamed: `from_pretrained` loads it."""
    (folder / "config.json").write_text(json.dumps(ckpt.config.to_dict(), indent=2))
    write_safetensors(folder / "model.safetensors", stream_tensors(ckpt, dtype),
                      expected_shapes(ckpt.config), metadata={"format": "pt"})


def write_state_spaces(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """config.json with state-spaces' fields + pytorch_model.bin (what mamba_ssm's
    MambaLMHeadModel.from_pretrained reads); lm_head is included even when tied, as theirs is."""
    values, reason = state_spaces_config(ckpt.config)
    if reason:
        ckpt.notes.append(f"note: {reason}; wrote our config.json (this recipe loads it, "
                          f"state-spaces' mamba_ssm does not)")
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    state = dict(stream_tensors(ckpt, dtype))
    if ckpt.config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, folder / "pytorch_model.bin")
