"""The pieces of the training loop: model, optimizer, schedule, data, one optimizer step.

The step follows neuronx-distributed's conventions: microbatches accumulate gradients with
`xm.mark_step()` after each backward (one graph per microbatch), then one optimizer step and a
mark_step. The loss is the cross entropy summed over labelled tokens and divided by the labelled
tokens of the whole step (all microbatches, all data-parallel ranks), so microbatches and ranks
are weighted by labelled tokens, as in the Composer recipe.
"""

from __future__ import annotations

import math

import torch

from mamba.model import MambaLMHeadModel, no_weight_decay_names
from neuron.config import Settings
from neuron.parallel import lm_loss, parallelize
from neuron.runtime import CPU, World, import_nxd, mark_step


def build_model(s: Settings, world: World) -> MambaLMHeadModel:
    """The full model (seeded, or --init-from) cut to this rank, in --dtype, on the device."""
    torch.manual_seed(s.seed)
    if s.init_from:
        model = MambaLMHeadModel.from_pretrained(s.init_from)  # architecture checked in parse_settings
    else:
        model = MambaLMHeadModel(s.model)
    model = parallelize(model, s.tp)
    if s.dtype == "bfloat16":
        model.to(torch.bfloat16)
    if s.activation_checkpointing:
        checkpoint_blocks(model, world)
    model = model.to(world.device)
    # Moving to an XLA device gives every parameter attribute a new tensor of its own, so a tied head
    # would train apart from the embedding; tie again before the optimizer sees the parameters.
    model.tie_weights()
    return model


def checkpoint_blocks(model: MambaLMHeadModel, world: World) -> None:
    """Recompute each block in backward (the YAML's model.activation_checkpointing). The blocks'
    forward is wrapped in place, so parameter names, and with them checkpoints, do not change.
    On XLA, torch_xla's checkpoint (its optimisation barrier keeps the compiler from merging the
    recomputation back into the forward)."""
    if world.mode == CPU:
        from torch.utils.checkpoint import checkpoint

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False)
    else:
        from torch_xla.utils.checkpoint import checkpoint as run

    for layer in model.backbone.layers:
        def forward(hidden, residual, seq_idx=None, cache=None, _block=layer.forward):
            if cache is not None or not torch.is_grad_enabled():
                return _block(hidden, residual, seq_idx=seq_idx, cache=cache)
            return run(_block, hidden, residual, seq_idx)

        layer.forward = forward


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices; none on A_log, D, dt_bias, norms and biases (as the recipe)."""
    no_decay = no_weight_decay_names(model)
    params = dict(model.named_parameters())
    return [{"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, s: Settings, world: World) -> torch.optim.Optimizer:
    """torch AdamW. optimizer.name decoupled_adamw is Composer's DecoupledAdamW, whose decay per step is
    weight_decay * lr_t / lr (not scaled by lr): AdamW with weight_decay / lr does exactly that."""
    weight_decay = s.weight_decay / s.lr if s.optimizer == "decoupled_adamw" else s.weight_decay
    groups = param_groups(model, weight_decay)
    kwargs = dict(lr=s.lr, betas=s.betas, eps=s.eps)
    if not s.zero1:
        return torch.optim.AdamW(groups, **kwargs)
    import_nxd()
    from neuronx_distributed.parallel_layers import parallel_state as ps

    if world.mode == CPU:  # NeuronZero1Optimizer takes XLA tensors only; torch's shards over gloo
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                       process_group=ps.get_data_parallel_group(),
                                       weight_decay=weight_decay, **kwargs)
        zero.add_param_group(groups[1])
        return zero
    from neuronx_distributed.optimizer import NeuronZero1Optimizer

    return NeuronZero1Optimizer(
        groups, torch.optim.AdamW, optimizer_dtype=torch.float32, grad_clipping=s.grad_clip > 0,
        max_norm=s.grad_clip or 1.0, pin_layout=False, sharding_groups=ps.get_data_parallel_replica_groups(),
        grad_norm_groups=ps.get_tensor_model_parallel_replica_groups(), save_master_weights=True, **kwargs)


def lr_at(step: int, s: Settings) -> float:
    """The lr of optimizer step `step` (0-based), as Composer's {Cosine,Linear,Constant}WithWarmupScheduler
    give it for batch `step`: linear warmup from 0 over warmup_steps, then (scheduler.name) cosine or
    linear down to min_lr_ratio * lr at max_steps, or constant."""
    if step < s.warmup_steps:
        return s.lr * step / s.warmup_steps
    if s.scheduler == "constant":
        return s.lr
    span = s.max_steps - s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / span) if span > 0 else 0.0
    floor = s.min_lr_ratio
    if s.scheduler == "linear":
        return s.lr * (1 + (floor - 1) * progress)
    return s.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _data_parallel_sum(value: float, world: World) -> float:
    """Labelled tokens of the whole step: summed over data-parallel ranks (host numbers)."""
    if world.dp == 1:
        return value
    from neuronx_distributed.parallel_layers import parallel_state as ps

    if world.mode == CPU:
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        return float(t.item())
    import torch_xla.core.xla_model as xm

    t = torch.tensor([value], dtype=torch.float32, device=world.device)
    return float(xm.all_reduce(xm.REDUCE_SUM, t, groups=ps.get_data_parallel_replica_groups()).item())


def step_loss(total: torch.Tensor, world: World) -> float:
    """The step's loss over all data-parallel ranks (each rank's `total` is its share of it)."""
    if world.dp == 1:
        return float(total.item())
    from neuronx_distributed.parallel_layers import parallel_state as ps

    if world.mode == CPU:
        t = total.detach().clone()
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        return float(t.item()) / world.dp
    import torch_xla.core.xla_model as xm

    summed = xm.all_reduce(xm.REDUCE_SUM, total.detach(), groups=ps.get_data_parallel_replica_groups())
    return float(summed.item()) / world.dp


def _reduce_data_parallel_grads(model: torch.nn.Module, world: World) -> None:
    """Sum gradients over data-parallel ranks (ZeRO-1 on XLA does this itself)."""
    if world.dp == 1:
        return
    from neuronx_distributed.parallel_layers import parallel_state as ps

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world.mode == CPU:
        for g in grads:
            torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
    else:
        import torch_xla.core.xla_model as xm

        xm.all_reduce(xm.REDUCE_SUM, grads, groups=ps.get_data_parallel_replica_groups())


def train_step(model, optimizer, microbatches: list[dict], step: int, s: Settings,
               world: World) -> torch.Tensor:
    """One optimizer step over `microbatches` (this rank's); returns the step's loss (a device tensor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, s)
    labelled = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
    normaliser = max(1.0, _data_parallel_sum(float(labelled), world)) / world.dp
    total = torch.zeros((), device=world.device)
    for mb in microbatches:
        batch = {k: v.to(world.device) for k, v in mb.items()}
        logits = model(batch["input_ids"], seq_idx=batch["seq_idx"])
        loss = lm_loss(logits, batch["labels"], normaliser, s.model.vocab_size)
        loss.backward()
        total += loss.detach()
        mark_step()
    xla_zero1 = s.zero1 and world.mode != CPU
    if not xla_zero1:  # ZeRO-1 on XLA reduces, clips and steps in one
        _reduce_data_parallel_grads(model, world)
        if world.dp > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(world.dp)
        if s.grad_clip > 0:
            from neuronx_distributed.parallel_layers.grads import clip_grad_norm

            clip_grad_norm(list(model.parameters()), s.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark_step()
    return total
