"""neuron/train.py checkpoints (neuronx-distributed's layout) read without NxD or torch-xla.

Layout (NxD's own): CHECKPOINT_DIR/step_N/{model,optim}/dp_rank_XX_tp_rank_YY_pp_rank_00.pt,
user_content.pt (step, data position, model config, tp), done; CHECKPOINT_DIR/newest.
Each tp_rank file holds that rank's pieces under the native parameter names, cut as
mamba/model/tp_plan.py says, so the reader merges them with the same table. The shards are
plain torch.save files: this module imports only torch and mamba.model (neuron/ imports it,
never the other way round).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from mamba.interop.tensors import Checkpoint, ConvertError
from mamba.model import MambaConfig
from mamba.model.tp_plan import merge_state_dicts

MODEL_FILE = re.compile(r"dp_rank_00_tp_rank_(\d+)_pp_rank_00\.pt$")


def tag_of(step: int) -> str:
    return f"step_{step}"


def latest_tag(checkpoint_dir: str | os.PathLike) -> str | None:
    """The newest completed tag (NxD writes `done` last), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = []
    for entry in os.listdir(checkpoint_dir):
        m = re.fullmatch(r"step_(\d+)", entry)
        if m and os.path.exists(os.path.join(checkpoint_dir, entry, "done")):
            steps.append(int(m.group(1)))
    return tag_of(max(steps)) if steps else None


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_user_content(path: str | os.PathLike) -> dict:
    """step_N/user_content.pt (step, data position, model config, tp) as a dict."""
    content_file = Path(path) / "user_content.pt"
    if not content_file.is_file():
        raise ValueError(f"{path}: no user_content.pt, so no model config (not written by neuron/train.py)")
    content = _torch_load(content_file)
    if not isinstance(content, dict) or "model_config" not in content:
        raise ValueError(f"{content_file}: no model_config (not written by neuron/train.py)")
    return content


def read_neuron_checkpoint(path: str | os.PathLike) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """A neuron/train.py checkpoint (CHECKPOINT_DIR/step_N, or CHECKPOINT_DIR for the newest) ->
    (config, full native state dict)."""
    path = Path(path)
    if not (path / "model").is_dir():
        tag = latest_tag(path)
        if tag is None:
            raise ValueError(f"{path}: not a neuron checkpoint (no model/, no completed step_N inside)")
        path = path / tag
    content = read_user_content(path)
    config = MambaConfig.from_dict(content["model_config"])
    files = {}
    for f in (path / "model").iterdir():
        m = MODEL_FILE.search(f.name)
        if m:
            files[int(m.group(1))] = f
    tp = int(content.get("tp", len(files)))
    if sorted(files) != list(range(tp)):
        raise ValueError(f"{path / 'model'}: expected tensor-parallel shards 0..{tp - 1}, "
                         f"found {sorted(files)}")
    shards = [_torch_load(files[r]) for r in range(tp)]
    shards = [{k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in shards]
    full = merge_state_dicts(shards, config)
    if config.tie_embeddings:
        head, embedding = full.get("lm_head.weight"), full["backbone.embedding.weight"]
        if head is not None and not torch.equal(head, embedding):
            # written before neuron/ re-tied the head after moving to the XLA device: the two trained
            # apart, and the trained model's logits come from the head, so keep both, untied
            return dataclasses.replace(config, tie_embeddings=False), full
        full["lm_head.weight"] = embedding
    return config, full


def read_neuron(src: str | os.PathLike) -> Checkpoint:
    """`python -m mamba.convert --from neuron CHECKPOINT_DIR[/step_N] --to FORMAT DST`: the merged
    checkpoint as a Checkpoint (a bad folder is a ConvertError, one line)."""
    try:
        config, state = read_neuron_checkpoint(src)
    except (ValueError, OSError, KeyError) as err:
        raise ConvertError(str(err)) from None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    getters = {name: (lambda t=t: t) for name, t in state.items()}
    return Checkpoint(config, getters, f"neuron checkpoint {src}")
