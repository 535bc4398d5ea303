"""Tensor parallelism for MambaLMHeadModel with neuronx-distributed's own layers, applied from outside.

`parallelize(model, tp)` swaps the model's linears, embedding and head for NxD's
ColumnParallelLinear / RowParallelLinear / ParallelEmbedding, slices the per-head tensors
(conv channels, A_log, D, dt_bias, the grouped norm weight) and sets each mixer's per-rank sizes,
all as mamba/model/tp_plan.py says; this rank's pieces of the model's current (full) weights are
copied in, so a TP run starts from exactly the weights a TP=1 run would. The model's own
forward runs unchanged; its head returns this rank's slice of the vocabulary, which
`lm_loss` turns into the masked mean cross entropy with NxD's parallel cross entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mamba.model import MambaLMHeadModel
from mamba.model.config import ATTENTION, MAMBA1, MAMBA2, MLP
from mamba.model.tp_plan import check_tp, local_attributes, shard_state_dict, tp_plan
from neuron.runtime import import_nxd

IGNORE_INDEX = -100


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (the model splits and transposes
    the projections' outputs; NxD's backward views the gradient as 2-D)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _layers():
    """NxD's parallel linears, taking any input layout (their backward views the saved input)."""
    import_nxd()
    from neuronx_distributed.parallel_layers import layers, mappings

    class ColumnParallelLinear(layers.ColumnParallelLinear):
        def forward(self, input_):
            return _ContiguousGrad.apply(super().forward(input_.contiguous()))

    class RowParallelLinear(layers.RowParallelLinear):
        def forward(self, input_):
            return _ContiguousGrad.apply(super().forward(input_.contiguous()))

    class ReducedRowParallelLinear(RowParallelLinear):
        """Row-parallel whose (reduced) output feeds rank-local work again, so its gradient is a
        partial sum per rank and is all-reduced on the way back (Mamba-1's x_proj)."""

        def forward(self, input_):
            return mappings.copy_to_tensor_model_parallel_region(super().forward(input_))

    return layers, ColumnParallelLinear, RowParallelLinear, ReducedRowParallelLinear


def _column(linear: nn.Linear, dtype) -> nn.Module:
    _, column, _, _ = _layers()
    return column(linear.in_features, linear.out_features, bias=linear.bias is not None, gather_output=False,
                  dtype=dtype)


def _row(linear: nn.Linear, dtype, reduced_grad: bool = False) -> nn.Module:
    _, _, row, reduced = _layers()
    cls = reduced if reduced_grad else row
    return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, input_is_parallel=True,
               dtype=dtype)


def _swap_one_group_mamba2(mixer: nn.Module, tp: int, dtype) -> None:
    """ngroups=1: B/C replicated, the norm across ranks (neuron/replicated.py)."""
    from neuron.replicated import CrossRankGatedRMSNorm, OneGroupConv, OneGroupInProj

    _, column, _, _ = _layers()
    bc = 2 * mixer.d_state
    mixer.in_proj = OneGroupInProj(column, mixer.d_model, mixer.d_inner, mixer.nheads, bc,
                                   mixer.in_proj.bias is not None, tp, dtype)
    old = mixer.conv1d
    mixer.conv1d = OneGroupConv(mixer.d_inner // tp, bc, old.kernel_size[0], old.bias is not None, dtype)
    if mixer.norm is not None:
        mixer.norm = CrossRankGatedRMSNorm(mixer.d_inner // tp, mixer.d_inner, mixer.norm.eps,
                                           mixer.norm.norm_before_gate, dtype)
    mixer.out_proj = _row(mixer.out_proj, dtype)


def _swap_mixer(kind: str, mixer: nn.Module, config, tp: int, dtype) -> None:
    if kind == MAMBA2 and mixer.ngroups == 1 and tp > 1:
        _swap_one_group_mamba2(mixer, tp, dtype)
    elif kind in (MAMBA2, MAMBA1, ATTENTION):
        mixer.in_proj = _column(mixer.in_proj, dtype)
        mixer.out_proj = _row(mixer.out_proj, dtype)
    if kind == MLP:
        mixer.fc1 = _column(mixer.fc1, dtype)
        mixer.fc2 = _row(mixer.fc2, dtype)
    if kind in (MAMBA2, MAMBA1) and isinstance(mixer.conv1d, nn.Conv1d):  # this rank's channels
        channels = local_attributes(kind, config, tp)
        conv_dim = channels.get("conv_dim", channels["d_inner"])
        old = mixer.conv1d
        mixer.conv1d = nn.Conv1d(conv_dim, conv_dim, old.kernel_size[0], groups=conv_dim,
                                 padding=old.padding[0], bias=old.bias is not None, dtype=dtype)
    if kind == MAMBA1:
        mixer.x_proj = _row(mixer.x_proj, dtype, reduced_grad=True)
        old = mixer.dt_proj
        mixer.dt_proj = nn.Linear(old.in_features, old.out_features // tp, bias=True, dtype=dtype)
    for attr, value in local_attributes(kind, config, tp).items():
        setattr(mixer, attr, value)


def parallelize(model: MambaLMHeadModel, tp: int) -> MambaLMHeadModel:
    """In place; NxD's model parallel groups must be initialised (neuron.runtime.init_distributed).
    Returns the model, on CPU, holding this rank's pieces of its former weights."""
    nxd = import_nxd()
    from neuronx_distributed.parallel_layers import parallel_state as ps
    from neuronx_distributed.parallel_layers.utils import set_tensor_model_parallel_attributes

    config = model.config
    check_tp(config, tp)
    if ps.get_tensor_model_parallel_size() != tp:
        raise ValueError(f"tp={tp} but NxD was initialised with tensor_model_parallel_size="
                         f"{ps.get_tensor_model_parallel_size()}")
    rank = ps.get_tensor_model_parallel_rank()
    shard = shard_state_dict(model.state_dict(), config, tp, rank)
    no_decay = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    dtype = model.backbone.embedding.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):  # NxD's ParallelEmbedding casts anything else to bf16
        raise ValueError(f"parallelize: model dtype {dtype}; NxD's layers take float32 or bfloat16")

    layers, column, _, _ = _layers()
    embedding = model.backbone.embedding
    model.backbone.embedding = layers.ParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim,
                                                        dtype=dtype)
    model.lm_head = column(config.d_model, config.padded_vocab_size, bias=False, gather_output=False,
                           dtype=dtype)
    for layer in model.backbone.layers:
        _swap_mixer(layer.kind, layer.mixer, config, tp, dtype)
        if layer.mlp is not None:
            _swap_mixer(MLP, layer.mlp, config, tp, dtype)
    model.tie_weights()
    model.lm_head._tied = config.tie_embeddings

    current = model.state_dict()
    if set(current) != set(shard):
        odd = sorted(set(current) ^ set(shard))[:3]
        raise RuntimeError(f"parallel model and plan disagree on tensor names (e.g. {odd})")
    for name, piece in shard.items():  # plain per-head tensors (A_log, D, dt_bias, norm): this rank's size
        if current[name].shape != piece.shape:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            nxd_layer = isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear,
                                            layers.ParallelEmbedding))
            if nxd_layer or not isinstance(getattr(module, leaf, None), nn.Parameter):
                raise RuntimeError(f"{name}: parallel shape {tuple(current[name].shape)} != plan "
                                   f"{tuple(piece.shape)}")
            setattr(module, leaf, nn.Parameter(torch.empty(piece.shape, dtype=current[name].dtype)))
    model.load_state_dict(shard)

    plan = tp_plan(config)
    for name, param in model.named_parameters():
        split = plan.get(name)
        sharded = (split is not None and split.dim is not None) or name.endswith((".x_weight", ".x_bias"))
        if sharded and not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, True, 0 if split is None else split.dim, 1, tp)
        if name in no_decay:
            param._no_weight_decay = True
    del nxd
    return model


def lm_loss(logits_parallel: torch.Tensor, labels: torch.Tensor, normaliser, vocab_size: int) -> torch.Tensor:
    """sum over labelled tokens of cross entropy / normaliser, from this rank's vocabulary slice
    [b, l, V/tp] of the padded vocabulary (NxD's parallel cross entropy; exact for any tp, tp=1
    included). The padding rows (ids >= vocab_size) are no classes, as in the Composer recipe
    (mamba/model/loss.py): their logits are pushed to the lowest float, so they add nothing to the
    softmax and get no gradient."""
    import_nxd()
    from neuronx_distributed.parallel_layers import parallel_state as ps
    from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

    mask = labels != IGNORE_INDEX
    targets = torch.where(mask, labels, torch.zeros_like(labels))
    # a copy in at least float32: NxD's parallel cross entropy shifts its input in place
    dtype = torch.promote_types(logits_parallel.dtype, torch.float32)
    logits = logits_parallel.to(dtype, copy=True)
    local = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * local
    if first + local > vocab_size:
        padding = torch.arange(first, first + local, device=logits.device) >= vocab_size
        logits.masked_fill_(padding, torch.finfo(dtype).min)
    per_token = parallel_cross_entropy(logits, targets)
    return (per_token * mask).sum() / normaliser


def gather_logits(logits_parallel: torch.Tensor) -> torch.Tensor:
    """All ranks' vocabulary slices -> full logits [b, l, V] (for tests and evaluation)."""
    import_nxd()
    from neuronx_distributed.parallel_layers.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits_parallel)


def full_state_dict(model: MambaLMHeadModel, tp: int) -> dict[str, torch.Tensor]:
    """Every rank's pieces gathered into the full (native) state dict, on every rank (CPU mode)."""
    from mamba.model.tp_plan import merge_state_dicts

    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if tp == 1:
        return local
    from neuronx_distributed.parallel_layers import parallel_state as ps

    pieces = []
    group = ps.get_tensor_model_parallel_group()
    for name, tensor in local.items():
        out = [torch.empty_like(tensor) for _ in range(tp)]
        torch.distributed.all_gather(out, tensor.contiguous(), group=group)
        pieces.append((name, out))
    shards = [{name: out[r] for name, out in pieces} for r in range(tp)]
    return merge_state_dicts(shards, model.config)
