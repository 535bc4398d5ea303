"""Checkpoints through neuronx-distributed's save/load, and the reader that merges them.

Layout (NxD's own): CHECKPOINT_DIR/step_N/{model,optim}/dp_rank_XX_tp_rank_YY_pp_rank_00.pt,
user_content.pt (step, data position, model config, tp), done; CHECKPOINT_DIR/newest.
Each tp_rank file holds that rank's pieces under the native parameter names, cut as
mamba/model/tp_plan.py says, so `read_neuron_checkpoint` merges them with the same table.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from mamba.model import MambaConfig
from mamba.model.tp_plan import merge_state_dicts
from neuron.runtime import CPU, barrier, import_nxd, mode

MODEL_FILE = re.compile(r"dp_rank_00_tp_rank_(\d+)_pp_rank_00\.pt$")


@contextlib.contextmanager
def _gloo_rendezvous():
    """NxD's checkpoint code synchronises with xm.rendezvous, which is no barrier in gloo CPU mode."""
    if mode() != CPU:
        yield
        return
    import torch_xla.core.xla_model as xm

    original = xm.rendezvous
    xm.rendezvous = lambda *args, **kwargs: torch.distributed.barrier()
    try:
        yield
    finally:
        xm.rendezvous = original


def tag_of(step: int) -> str:
    return f"step_{step}"


def _local_optimizer(optimizer):
    """What NxD saves and loads as a dict: torch's ZeroRedundancyOptimizer (ZeRO-1 over gloo) by its
    own shard's optimizer; NxD's load takes no plain torch optimizer object."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _is_nxd_zero1(optimizer) -> bool:
    return type(optimizer).__name__ == "NeuronZero1Optimizer"


def save(checkpoint_dir: str, step: int, model, optimizer, user_content: dict, keep_last: int | None) -> str:
    """Save model + optimizer shards and user_content as tag step_N; keep the newest keep_last."""
    nxd = import_nxd()
    nxd_zero1 = _is_nxd_zero1(optimizer)
    local = optimizer if nxd_zero1 else _local_optimizer(optimizer)
    state = optimizer if nxd_zero1 else local.state_dict()
    with _gloo_rendezvous():
        nxd.save_checkpoint(checkpoint_dir, tag_of(step), model=model, optimizer=state,
                            user_content=user_content, num_kept_ckpts=keep_last, num_workers=1,
                            zero1_optimizer=local is not optimizer)
        nxd.finalize_checkpoint()
    barrier("neuron checkpoint saved")
    return os.path.join(checkpoint_dir, tag_of(step))


def latest_tag(checkpoint_dir: str) -> str | None:
    """The newest completed tag (NxD writes `done` last), or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = []
    for entry in os.listdir(checkpoint_dir):
        m = re.fullmatch(r"step_(\d+)", entry)
        if m and os.path.exists(os.path.join(checkpoint_dir, entry, "done")):
            steps.append(int(m.group(1)))
    return tag_of(max(steps)) if steps else None


def load(checkpoint_dir: str, tag: str, model, optimizer) -> dict:
    """Load this rank's shards into model and optimizer; returns the user_content."""
    nxd = import_nxd()
    nxd_zero1 = _is_nxd_zero1(optimizer)
    state = optimizer if nxd_zero1 else {}
    with _gloo_rendezvous():
        content = nxd.load_checkpoint(checkpoint_dir, tag=tag, model=model, optimizer=state)
    if not nxd_zero1:
        _local_optimizer(optimizer).load_state_dict(state)
    if not isinstance(content, dict):
        where = os.path.join(checkpoint_dir, tag)
        raise ValueError(f"{where}: no user_content.pt (not written by neuron/train.py)")
    return content


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_neuron_checkpoint(path: str | os.PathLike) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """A neuron/train.py checkpoint (CHECKPOINT_DIR/step_N, or CHECKPOINT_DIR for the newest) ->
    (config, full native state dict). No NxD or torch-xla needed: the shards are torch.save files."""
    path = Path(path)
    if not (path / "model").is_dir():
        tag = latest_tag(str(path))
        if tag is None:
            raise ValueError(f"{path}: not a neuron checkpoint (no model/, no completed step_N inside)")
        path = path / tag
    content_file = path / "user_content.pt"
    if not content_file.is_file():
        raise ValueError(f"{path}: no user_content.pt, so no model config (not written by neuron/train.py)")
    content = _torch_load(content_file)
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
        full["lm_head.weight"] = full["backbone.embedding.weight"]
    return config, full


def read_neuron(src: str | os.PathLike):
    """`python -m mamba.convert --from neuron CHECKPOINT_DIR[/step_N] --to FORMAT DST`: the merged
    checkpoint as mamba.interop's Checkpoint (a bad folder is a ConvertError, one line)."""
    from mamba.interop.tensors import Checkpoint, ConvertError

    try:
        config, state = read_neuron_checkpoint(src)
    except (ValueError, OSError, KeyError) as err:
        raise ConvertError(str(err)) from None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    getters = {name: (lambda t=t: t) for name, t in state.items()}
    return Checkpoint(config, getters, f"neuron checkpoint {src}")
