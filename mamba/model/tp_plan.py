"""Tensor parallelism, written once: which tensor splits how across `tp` ranks.

Every parameter of `MambaLMHeadModel` has a `Split`: `dim=None` (replicated on every rank) or a
dimension cut into `segments`. Each segment is divided evenly and rank r takes the r-th piece of
every segment, in order (a `replicated` segment is kept whole on every rank). Mamba-2's in_proj
rows are [z | x | B | C | dt], so rank r holds [z_r | x_r | B_r | C_r | dt_r]: its own heads (z,
x, dt) and its own groups (B, C). The grouped gated RMSNorm then normalises each group on the
rank that owns it, and out_proj (cut along its input) is the one reduction per mixer. With
ngroups=1 (every state-spaces Mamba-2) B and C are replicated instead: each rank computes them
whole, their gradients are summed over ranks, and the norm (now over all d_inner channels) adds
one cross-rank sum of squares. Attention splits by KV groups, the MLP as fc1 column /
fc2 row, the embedding and LM head along the vocabulary (a tied head stays the embedding).

neuron/parallel.py applies this plan with neuronx-distributed's layers; `shard_state_dict` /
`merge_state_dicts` cut a full state dict into per-rank pieces and put them back together
(checkpoint conversion). `local_attributes` gives the per-rank sizes a sharded mixer runs with.
Pure torch: no distributed code here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba.model.config import ATTENTION, MAMBA1, MAMBA2, MLP, MambaConfig


@dataclass(frozen=True)
class Split:
    """How one tensor is cut: `dim` None = replicated; else each of `segments` (sizes along
    `dim`, summing to the tensor's size) is divided into tp equal pieces."""

    dim: int | None = None
    segments: tuple[int, ...] = ()
    replicated: tuple[int, ...] = ()  # indices of segments every rank holds whole
    # Only Mamba-1's x_proj: cut along its input, but each rank's output is a partial sum.
    partial_output: bool = False


REPLICATED = Split()


def _rows(*segments: int, replicated: tuple[int, ...] = ()) -> Split:
    return Split(0, tuple(segments), replicated)


def _cols(size: int, partial_output: bool = False) -> Split:
    return Split(1, (size,), partial_output=partial_output)


def _mlp_hidden(config: MambaConfig) -> int:
    hidden = config.d_intermediate
    if config.mlp_activation == "swiglu":  # as mamba.model.mlp.MLP rounds it
        hidden = -(-hidden // 128) * 128
    return hidden


def _mixer_plan(kind: str, config: MambaConfig) -> dict[str, Split]:
    """Split of each parameter of one mixer (names relative to the mixer)."""
    d = config.d_model
    if kind == MAMBA2:
        o = config.ssm_options(MAMBA2)
        di = o["expand"] * d
        h, gn = di // o["headdim"], o["ngroups"] * o["d_state"]
        bc = (2, 3) if o["ngroups"] == 1 else ()  # one group: B and C replicated (module doc)
        conv_bc = (1, 2) if o["ngroups"] == 1 else ()
        plan = {"in_proj.weight": _rows(di, di, gn, gn, h, replicated=bc),
                "conv1d.weight": _rows(di, gn, gn, replicated=conv_bc),
                "dt_bias": _rows(h), "A_log": _rows(h), "D": _rows(di if o["D_has_hdim"] else h),
                "out_proj.weight": _cols(di)}
        if o["bias"]:
            plan.update({"in_proj.bias": _rows(di, di, gn, gn, h, replicated=bc),
                         "out_proj.bias": REPLICATED})
        if o["conv_bias"]:
            plan["conv1d.bias"] = _rows(di, gn, gn, replicated=conv_bc)
        if o["rmsnorm"]:
            plan["norm.weight"] = _rows(di)
        return plan
    if kind == MAMBA1:
        o = config.ssm_options(MAMBA1)
        di = o["expand"] * d
        plan = {"in_proj.weight": _rows(di, di), "conv1d.weight": _rows(di),
                "x_proj.weight": _cols(di, partial_output=True), "dt_proj.weight": _rows(di),
                "dt_proj.bias": _rows(di), "A_log": _rows(di), "D": _rows(di),
                "out_proj.weight": _cols(di)}
        if o["bias"]:
            plan.update({"in_proj.bias": _rows(di, di), "out_proj.bias": REPLICATED})
        if o["conv_bias"]:
            plan["conv1d.bias"] = _rows(di)
        return plan
    if kind == ATTENTION:
        o = config.attn_options()
        q, kv = o["num_heads"] * o["head_dim"], o["num_heads_kv"] * o["head_dim"]
        plan = {"in_proj.weight": _rows(q, kv, kv), "out_proj.weight": _cols(q)}
        if o["qkv_proj_bias"]:
            plan["in_proj.bias"] = _rows(q, kv, kv)
        if o["out_proj_bias"]:
            plan["out_proj.bias"] = REPLICATED
        return plan
    hidden = _mlp_hidden(config)
    gated = config.mlp_activation == "swiglu"
    return {"fc1.weight": _rows(hidden, hidden) if gated else _rows(hidden), "fc2.weight": _cols(hidden)}


def check_tp(config: MambaConfig, tp: int) -> None:
    """Raise ValueError naming the value and the fix when `config` cannot be split `tp` ways."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r}: tensor-parallel degree must be a positive integer")
    if tp == 1:
        return
    if config.padded_vocab_size % tp:
        raise ValueError(f"padded vocab size {config.padded_vocab_size} is not divisible by tp={tp}: "
                         f"set model.pad_vocab_size_multiple to a multiple of {tp}")
    kinds = set(config.layer_kinds())
    if MAMBA2 in kinds:
        o = config.ssm_options(MAMBA2)
        nheads = o["expand"] * config.d_model // o["headdim"]
        if o.get("norm_across_channels") and o["ngroups"] > 1:
            raise ValueError(f"ssm_cfg.norm_across_channels=true (transformers < 5's Mamba-2) normalises "
                             f"over all d_inner channels, which tp={tp} would split: train it with --tp 1, "
                             f"or use norm_across_channels: false (per-group norm) for a new model")
        if o["ngroups"] > 1 and o["ngroups"] % tp:  # nheads is a multiple of ngroups: heads split too
            raise ValueError(
                f"ssm_cfg.ngroups={o['ngroups']} is not divisible by tp={tp}: Mamba-2 splits its B/C "
                f"groups and its grouped gate norm across ranks (so TP is exact); use --tp dividing "
                f"{o['ngroups']}, or a model with ngroups 1 or a multiple of {tp}")
        if nheads % tp:
            raise ValueError(f"Mamba-2 heads d_inner/headdim={nheads} not divisible by tp={tp}: "
                             f"use --tp dividing {nheads}")
    if MAMBA1 in kinds:
        di = config.ssm_options(MAMBA1)["expand"] * config.d_model
        if di % tp:
            raise ValueError(f"Mamba-1 d_inner={di} not divisible by tp={tp}: use --tp dividing {di}")
    if ATTENTION in kinds:
        o = config.attn_options()
        if o["num_heads_kv"] % tp:
            raise ValueError(f"attn_cfg.num_heads_kv={o['num_heads_kv']} not divisible by tp={tp}: "
                             f"attention splits by KV groups; use --tp dividing {o['num_heads_kv']}")
    with_mlp = config.layer_pattern is None and config.d_intermediate > 0
    if (MLP in kinds or with_mlp) and _mlp_hidden(config) % tp:
        raise ValueError(f"MLP width {_mlp_hidden(config)} not divisible by tp={tp}: "
                         f"change d_intermediate or --tp")


def tp_plan(config: MambaConfig) -> dict[str, Split]:
    """Full state-dict name -> Split, for every tensor of MambaLMHeadModel(config)."""
    plan: dict[str, Split] = {"backbone.embedding.weight": _rows(config.padded_vocab_size),
                              "lm_head.weight": _rows(config.padded_vocab_size)}
    norm = ["weight"] if config.rms_norm else ["weight", "bias"]
    with_mlp = config.layer_pattern is None and config.d_intermediate > 0
    for i, kind in enumerate(config.layer_kinds()):
        prefix = f"backbone.layers.{i}"
        plan.update({f"{prefix}.norm.{p}": REPLICATED for p in norm})
        plan.update({f"{prefix}.mixer.{k}": v for k, v in _mixer_plan(kind, config).items()})
        if with_mlp:
            plan.update({f"{prefix}.norm2.{p}": REPLICATED for p in norm})
            plan.update({f"{prefix}.mlp.{k}": v for k, v in _mixer_plan(MLP, config).items()})
    plan.update({f"backbone.norm_f.{p}": REPLICATED for p in norm})
    return plan


def local_attributes(kind: str, config: MambaConfig, tp: int) -> dict[str, int]:
    """The size attributes a mixer of `kind` runs with on one of `tp` ranks."""
    if kind == MAMBA2:
        o = config.ssm_options(MAMBA2)
        di = o["expand"] * config.d_model // tp
        ngroups = max(1, o["ngroups"] // tp)
        return {"d_inner": di, "nheads": di // o["headdim"], "ngroups": ngroups, "norm_groups": ngroups,
                "conv_dim": di + 2 * ngroups * o["d_state"]}
    if kind == MAMBA1:
        return {"d_inner": config.ssm_options(MAMBA1)["expand"] * config.d_model // tp}
    if kind == ATTENTION:
        o = config.attn_options()
        return {"num_heads": o["num_heads"] // tp, "num_heads_kv": o["num_heads_kv"] // tp}
    return {"hidden": _mlp_hidden(config) // tp}


def shard_tensor(tensor: torch.Tensor, split: Split, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of `tensor` (a clone, contiguous)."""
    if split.dim is None or tp == 1:
        return tensor.clone()
    if sum(split.segments) != tensor.shape[split.dim]:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not match segments "
                         f"{split.segments} along dim {split.dim}")
    pieces = []
    for i, segment in enumerate(tensor.split(list(split.segments), dim=split.dim)):
        pieces.append(segment if i in split.replicated else segment.chunk(tp, dim=split.dim)[rank])
    return torch.cat(pieces, dim=split.dim).contiguous()


def merge_tensor(pieces: list[torch.Tensor], split: Split) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks' pieces."""
    if split.dim is None or len(pieces) == 1:
        return pieces[0].clone()
    tp = len(pieces)
    local = [s if i in split.replicated else s // tp for i, s in enumerate(split.segments)]
    per_rank = [piece.split(local, dim=split.dim) for piece in pieces]
    segments = [per_rank[0][s] if s in split.replicated else torch.cat([per_rank[r][s] for r in range(tp)],
                                                                       dim=split.dim)
                for s in range(len(local))]
    return torch.cat(segments, dim=split.dim).contiguous()


def _split_of(plan: dict[str, Split], name: str) -> Split:
    if name not in plan:
        raise KeyError(f"{name}: not a parameter of this model config (no tensor-parallel plan for it)")
    return plan[name]


def shard_state_dict(full_sd: dict[str, torch.Tensor], config: MambaConfig, tp: int,
                     rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict, same names as the full one, each tensor cut by the plan."""
    check_tp(config, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank={rank} outside 0..tp-1={tp - 1}")
    plan = tp_plan(config)
    return {name: shard_tensor(t, _split_of(plan, name), tp, rank) for name, t in full_sd.items()}


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: MambaConfig) -> dict[str, torch.Tensor]:
    """The full state dict from all ranks' state dicts (rank order); replicated tensors from rank 0."""
    if not shards:
        raise ValueError("merge_state_dicts: no shards given")
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            missing = sorted(set(names) ^ set(shard))[:3]
            raise ValueError(f"rank {r} holds different tensors from rank 0 (e.g. {missing})")
    plan = tp_plan(config)
    return {name: merge_tensor([s[name] for s in shards], _split_of(plan, name)) for name in names}
