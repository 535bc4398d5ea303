"""Checkpoints through neuronx-distributed's save/load.

Layout (NxD's own): CHECKPOINT_DIR/step_N/{model,optim}/dp_rank_XX_tp_rank_YY_pp_rank_00.pt,
user_content.pt (step, data position, model config, tp), done; CHECKPOINT_DIR/newest.
The reader that merges the shards into a native state dict needs neither NxD nor XLA and lives
with the other format readers, in mamba/interop/neuron.py (re-exported here).
"""

from __future__ import annotations

import contextlib
import os

import torch

from mamba.interop.neuron import (  # noqa: F401 - re-exported: neuron/'s callers and tests use them
    latest_tag,
    read_neuron,
    read_neuron_checkpoint,
    read_user_content,
    tag_of,
)
from neuron.runtime import CPU, barrier, import_nxd, mark_step, mode


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


def load(checkpoint_dir: str, tag: str, model, optimizer) -> dict:
    """Load this rank's shards into model and optimizer; returns the user_content."""
    nxd = import_nxd()
    nxd_zero1 = _is_nxd_zero1(optimizer)
    state = optimizer if nxd_zero1 else {}
    with _gloo_rendezvous():
        content = nxd.load_checkpoint(checkpoint_dir, tag=tag, model=model, optimizer=state)
    if not nxd_zero1:
        _local_optimizer(optimizer).load_state_dict(state)
    # The first step after a resume must be the same XLA graph as every other step, or it is compiled
    # anew at each resume (--compile-cache cannot serve it): NxD's ZeRO-1 load leaves a zero gradient
    # on every parameter (a step starts with none), and what loading left pending runs here, apart.
    model.zero_grad(set_to_none=True)
    mark_step()
    if not isinstance(content, dict):
        where = os.path.join(checkpoint_dir, tag)
        raise ValueError(f"{where}: no user_content.pt (not written by neuron/train.py)")
    return content
