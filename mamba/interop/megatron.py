"""NVIDIA Megatron-LM / NeMo Mamba-2 and Mamba2-Hybrid checkpoints -> native form.

Layout: `<dir>/release/mp_rank_0K/model_optim_rng.pt` (or `iter_NNNNNNN/`), a pickle holding
`model` (the state dict), `args` (argparse.Namespace) and rng state (numpy arrays). Layer kinds
come from the keys: `decoder.layers.N.mixer` -> M, `.self_attention` -> *, `.mlp` -> -.
Tensor-parallel ranks are merged per component: each rank holds its own [z, x, B, C, dt] block
of in_proj and [x, B, C] block of conv1d.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from mamba.interop.tensors import (
    Checkpoint,
    ConvertError,
    Getter,
    load_torch,
    megatron_globals,
)
from mamba.model.config import ATTENTION, MAMBA2, MLP, MambaConfig

LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
MAMBA_NORMS = ("norm.weight", "mixer.in_proj.layer_norm_weight")
ATTN_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
MLP_NORMS = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")


def rank_files(src: Path) -> list[Path]:
    """model_optim_rng.pt of every tensor-parallel rank, from a file or a checkpoint folder."""
    if src.is_file():
        if re.fullmatch(r"mp_rank_\d+", src.parent.name):
            return rank_files(src.parent.parent)
        return [src]
    if not src.is_dir():
        raise ConvertError(f"{src}: no such file or folder")
    if re.fullmatch(r"mp_rank_\d+", src.name):
        return rank_files(src.parent)
    tracker = src / "latest_checkpointed_iteration.txt"
    if not any(src.glob("mp_rank_*")):
        if (src / "release").is_dir():
            return rank_files(src / "release")
        if tracker.is_file():
            step = tracker.read_text().strip()
            return rank_files(src / ("release" if step == "release" else f"iter_{int(step):07d}"))
        raise ConvertError(f"{src}: no mp_rank_*/ folders, release/ or "
                           f"latest_checkpointed_iteration.txt; not a Megatron checkpoint")
    ranks = sorted(src.glob("mp_rank_*"))
    pipelined = [r.name for r in ranks if not re.fullmatch(r"mp_rank_\d+", r.name)]
    if pipelined:
        raise ConvertError(f"{src}: pipeline-parallel ranks ({pipelined[0]}) are not supported; "
                           f"re-save with pipeline_model_parallel_size=1")
    files = [r / "model_optim_rng.pt" for r in ranks]
    for i, (rank, file) in enumerate(zip(ranks, files, strict=True)):
        if rank.name != f"mp_rank_{i:02d}":
            raise ConvertError(f"{src}: tensor-parallel ranks are not contiguous ({rank.name} "
                               f"where mp_rank_{i:02d} was expected)")
        if not file.is_file():
            raise ConvertError(f"{file}: missing")
    return files


def _load_rank(path: Path, unsafe: bool) -> tuple[dict, dict]:
    blob = load_torch(path, megatron_globals(), unsafe=unsafe)
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise ConvertError(f"{path}: not a Megatron checkpoint (no 'model' state dict)")
    args = blob.get("args")
    state = _conv_as_module({k: v for k, v in blob["model"].items()
                             if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}, path)
    if args is None or isinstance(args, dict):
        return state, dict(args or {})
    return state, vars(args)


def _conv_as_module(state: dict, path: Path) -> dict:
    """Newer Megatron-LM keeps the Mamba conv as parameters `mixer.conv1d_weight` ([c, 1, w] or
    [c, w]) and `mixer.conv1d_bias` instead of a `mixer.conv1d` module: rename to the module form."""
    out = {}
    for key, value in state.items():
        if key.endswith(".mixer.conv1d_weight"):
            key = key[:-len("conv1d_weight")] + "conv1d.weight"
            value = value.unsqueeze(1) if value.dim() == 2 else value
        elif key.endswith(".mixer.conv1d_bias"):
            key = key[:-len("conv1d_bias")] + "conv1d.bias"
        if key in out:
            raise ConvertError(f"{path}: {key} is stored both as a conv1d module and as a parameter")
        out[key] = value
    return out


def read_megatron(src: Path, ngroups: int | None = None, num_heads: int | None = None,
                  num_kv_heads: int | None = None, mlp_activation: str | None = None,
                  unsafe: bool = False) -> Checkpoint:
    files = rank_files(src)
    loaded = [_load_rank(f, unsafe) for f in files]
    ranks = [s for s, _ in loaded]
    args = loaded[0][1]
    tp = len(ranks)
    where = f"{files[0]}" + (f" (+{tp - 1} tensor-parallel ranks)" if tp > 1 else "")
    state0 = ranks[0]

    def cat(key: str, dim: int = 0) -> Getter:
        return lambda: torch.cat([r[key] for r in ranks], dim=dim) if tp > 1 else state0[key]

    def size(key: str, dim: int = 0) -> int:
        return sum(r[key].shape[dim] for r in ranks)

    for name in ("embedding.word_embeddings.weight", "decoder.final_norm.weight"):
        if name not in state0:
            raise ConvertError(f"{files[0]}: no {name}; not a Megatron Mamba checkpoint")
    d_model = state0["embedding.word_embeddings.weight"].shape[1]
    layer_keys: dict[int, list[str]] = defaultdict(list)
    for key in state0:
        m = LAYER.match(key)
        if m:
            layer_keys[int(m.group(1))].append(m.group(2))
    n_layer = max(layer_keys) + 1 if layer_keys else 0
    pattern = "".join(_layer_kind(i, layer_keys.get(i, []), files[0]) for i in range(n_layer))
    declared = args.get("hybrid_override_pattern")
    if declared and declared != pattern:
        raise ConvertError(f"{files[0]}: args.hybrid_override_pattern={declared!r} but the keys give "
                           f"{pattern!r}")

    tensors: dict[str, Getter] = {"backbone.embedding.weight": cat("embedding.word_embeddings.weight"),
                                  "backbone.norm_f.weight": lambda: state0["decoder.final_norm.weight"]}
    if "output_layer.weight" in state0:
        tensors["lm_head.weight"] = cat("output_layer.weight")
    used = {"embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight"}
    ssm_cfg: dict = {}
    attn_cfg: dict = {}
    d_intermediate = 0
    for i, kind in enumerate(pattern):
        p, ours = f"decoder.layers.{i}.", f"backbone.layers.{i}."
        names = set(layer_keys[i])
        norms = {MAMBA2: MAMBA_NORMS, ATTENTION: ATTN_NORMS, MLP: MLP_NORMS}[kind]
        norm = next((n for n in norms if n in names), None)
        if norm is not None:
            tensors[ours + "norm.weight"] = (lambda k=p + norm: state0[k])
            used.add(p + norm)
        if kind == MAMBA2:
            if not ssm_cfg:
                ssm_cfg = _mamba_dims(p, ranks, d_model, args, ngroups, where)
            dims = _component_sizes(ssm_cfg, d_model, tp)
            for leaf, comps in (("in_proj.weight", dims["in_proj"]), ("conv1d.weight", dims["conv"]),
                                ("conv1d.bias", dims["conv"])):
                key = p + "mixer." + leaf
                if key in state0:
                    tensors[ours + "mixer." + leaf] = _merge_components(ranks, key, comps)
                    used.add(key)
            for leaf in ("A_log", "D", "dt_bias", "norm.weight"):
                if p + "mixer." + leaf in state0:
                    tensors[ours + "mixer." + leaf] = cat(p + "mixer." + leaf)
                    used.add(p + "mixer." + leaf)
            if p + "mixer.out_proj.weight" in state0:
                tensors[ours + "mixer.out_proj.weight"] = cat(p + "mixer.out_proj.weight", 1)
                used.add(p + "mixer.out_proj.weight")
        elif kind == ATTENTION:
            qkv = p + "self_attention.linear_qkv."
            if not attn_cfg:
                attn_cfg = _attention_dims(qkv + "weight", p + "self_attention.linear_proj.weight",
                                           ranks, d_model, args, num_heads, num_kv_heads, where)
            for leaf in ("weight", "bias"):
                if qkv + leaf in state0:
                    tensors[ours + "mixer.in_proj." + leaf] = _regroup_qkv(cat(qkv + leaf), attn_cfg)
                    used.add(qkv + leaf)
            proj = p + "self_attention.linear_proj."
            if proj + "weight" in state0:
                tensors[ours + "mixer.out_proj.weight"] = cat(proj + "weight", 1)
                used.add(proj + "weight")
            if proj + "bias" in state0:
                tensors[ours + "mixer.out_proj.bias"] = (lambda k=proj + "bias": state0[k])
                used.add(proj + "bias")
        else:
            fc1, fc2 = p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"
            if fc1 in state0:
                d_intermediate = d_intermediate or size(fc1)
                tensors[ours + "mixer.fc1.weight"] = cat(fc1)
                used.add(fc1)
            if fc2 in state0:
                tensors[ours + "mixer.fc2.weight"] = cat(fc2, 1)
                used.add(fc2)
    for key in state0:  # anything not understood is reported as unexpected, under its own name
        if key not in used:
            tensors[key] = (lambda k=key: state0[k])

    if args.get("swiglu") or args.get("gated_linear_unit"):
        raise ConvertError(f"{where}: gated (SwiGLU) Megatron MLPs are not supported")
    activation = mlp_activation or ("relu2" if args.get("squared_relu") else "gelu")
    if args.get("position_embedding_type") == "rope" and attn_cfg:
        attn_cfg["rotary_emb_dim"] = int(attn_cfg["head_dim"] * args.get("rotary_percent", 1.0))
        attn_cfg["rotary_emb_base"] = float(args.get("rotary_base", 10000))
    if args.get("normalization", "RMSNorm") != "RMSNorm":
        raise ConvertError(f"{where}: args.normalization={args['normalization']!r}; only RMSNorm "
                           f"Megatron models are supported")
    try:
        config = MambaConfig(
            d_model=d_model, n_layer=n_layer, vocab_size=size("embedding.word_embeddings.weight"),
            pad_vocab_size_multiple=1, layer_pattern=pattern, d_intermediate=d_intermediate,
            mlp_activation=activation, ssm_cfg=ssm_cfg, attn_cfg=attn_cfg,
            tie_embeddings="output_layer.weight" not in state0,
            norm_epsilon=float(args.get("norm_epsilon", 1e-5)))
    except ValueError as exc:
        raise ConvertError(f"{where}: the inferred config is invalid: {exc}") from None
    return Checkpoint(config, tensors, where)


def _layer_kind(i: int, names: list[str], where: Path) -> str:
    kinds = {MAMBA2 if n.startswith("mixer.") else ATTENTION if n.startswith("self_attention.")
             else MLP if n.startswith("mlp.") else None for n in names} - {None}
    if len(kinds) != 1:
        found = "none" if not kinds else ", ".join(sorted(kinds))
        raise ConvertError(f"{where}: decoder.layers.{i} has layer kinds {found}; expected exactly "
                           f"one of mixer (M), self_attention (*), mlp (-)")
    return kinds.pop()


def _mamba_dims(p: str, ranks: list[dict], d_model: int, args: dict, ngroups: int | None,
                where: str) -> dict:
    total = lambda leaf: sum(r[p + "mixer." + leaf].shape[0] for r in ranks)  # noqa: E731
    try:
        nheads, d_inner, conv_dim = total("A_log"), total("norm.weight"), total("conv1d.weight")
        d_conv = ranks[0][p + "mixer.conv1d.weight"].shape[-1]
    except KeyError as exc:
        raise ConvertError(f"{where}: Mamba layer {p} lacks {exc.args[0]}") from None
    bc = conv_dim - d_inner  # 2 * ngroups * d_state
    ngroups = ngroups or args.get("mamba_num_groups")
    d_state = args.get("mamba_state_dim")
    if ngroups is None:
        d_state = d_state or 128  # Megatron's default; ngroups then follows from the shapes
        ngroups = bc // (2 * d_state)
    d_state = bc // (2 * ngroups)
    if 2 * ngroups * d_state != bc or ngroups % len(ranks) or d_inner % d_model or d_inner % nheads:
        raise ConvertError(f"{where}: layer {p}: conv1d has {conv_dim} channels, d_inner={d_inner}, "
                           f"nheads={nheads}: inconsistent with ngroups={ngroups} over "
                           f"{len(ranks)} tensor-parallel rank(s); pass the right --ngroups")
    return dict(d_state=d_state, d_conv=d_conv, expand=d_inner // d_model,
                headdim=d_inner // nheads, ngroups=ngroups)


def _component_sizes(ssm: dict, d_model: int, tp: int) -> dict[str, list[int]]:
    d_inner = ssm["expand"] * d_model
    bc = ssm["ngroups"] * ssm["d_state"]
    nheads = d_inner // ssm["headdim"]
    return {"in_proj": [d_inner // tp, d_inner // tp, bc // tp, bc // tp, nheads // tp],
            "conv": [d_inner // tp, bc // tp, bc // tp]}


def _merge_components(ranks: list[dict], key: str, sizes: list[int]) -> Getter:
    def merge() -> torch.Tensor:
        if len(ranks) == 1:
            return ranks[0][key]
        pieces = [r[key].split(sizes, dim=0) for r in ranks]
        return torch.cat([torch.cat([p[c] for p in pieces]) for c in range(len(sizes))])
    return merge


def _attention_dims(qkv: str, proj: str, ranks: list[dict], d_model: int, args: dict,
                    num_heads: int | None, num_kv_heads: int | None, where: str) -> dict:
    heads = num_heads or args.get("num_attention_heads")
    if heads is None:
        raise ConvertError(f"{where}: no args.num_attention_heads in the checkpoint; pass --num-heads")
    kv = num_kv_heads or (args.get("num_query_groups") if args.get("group_query_attention")
                          else None) or heads
    head_dim = args.get("kv_channels") or d_model // heads
    rows = sum(r[qkv].shape[0] for r in ranks) if qkv in ranks[0] else None
    if rows is not None and rows != (heads + 2 * kv) * head_dim:
        raise ConvertError(f"{where}: {qkv} has {rows} rows, expected (num_heads + 2*num_kv_heads)"
                           f"*head_dim = ({heads} + 2*{kv})*{head_dim}; pass --num-heads / "
                           f"--num-kv-heads")
    return dict(num_heads=heads, num_heads_kv=kv, head_dim=head_dim,
                qkv_proj_bias=qkv.replace("weight", "bias") in ranks[0],
                out_proj_bias=proj.replace("weight", "bias") in ranks[0], rotary_emb_dim=0)


def _regroup_qkv(get: Getter, attn: dict) -> Getter:
    """Megatron rows per KV group [its q heads, k, v] -> ours [all q, all k, all v]."""
    heads, kv, hd = attn["num_heads"], attn["num_heads_kv"], attn["head_dim"]
    per = heads // kv

    def regroup() -> torch.Tensor:
        t = get()
        grouped = t.reshape(kv, per + 2, hd, *t.shape[1:])
        q = grouped[:, :per].reshape(heads * hd, *t.shape[1:])
        k = grouped[:, per].reshape(kv * hd, *t.shape[1:])
        v = grouped[:, per + 1].reshape(kv * hd, *t.shape[1:])
        return torch.cat([q, k, v])
    return regroup
