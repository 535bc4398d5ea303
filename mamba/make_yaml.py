"""Write a pretraining yaml for a given model size.

    python -m mamba.make_yaml --d-model 1024 --n-layer 48 --vocab 50277 --layer mamba2 \
        --out yamls/pretrain/my-370m.yaml [--pattern "M-M*..."] [--data /data/mycorpus]

The result is a complete, strict-checked config (see yamls/pretrain/*.yaml); edit it freely.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mamba.model import MambaConfig
from mamba.strict import ConfigError
from mamba.train_config import parse_config

LAYERS = {"mamba1": "Mamba1", "mamba2": "Mamba2"}


def make_config(d_model: int, n_layer: int, vocab: int, layer: str = "mamba2",
                pattern: str | None = None, data: str = "runs/data/corpus", seq_len: int = 2048,
                global_batch_size: int = 256, micro_batch_size: int = 8, lr: float = 3e-4,
                tokens: float = 2e10, ngroups: int = 1, d_intermediate: int = 0,
                attn_heads: int | None = None, attn_kv_heads: int | None = None) -> dict:
    model: dict = {"vocab_size": vocab, "d_model": d_model, "n_layer": n_layer,
                   "pad_vocab_size_multiple": 16 if layer == "mamba2" else 8}
    ssm: dict = {"layer": LAYERS[layer]}
    if ngroups != 1:
        ssm["ngroups"] = ngroups
    model["ssm_cfg"] = ssm
    if pattern:
        model["layer_pattern"] = pattern
        model["n_layer"] = len(pattern)
        if "*" in pattern:
            heads = attn_heads or max(1, d_model // 128)
            model["attn_cfg"] = {"num_heads": heads, "num_heads_kv": attn_kv_heads or heads,
                                 "qkv_proj_bias": False, "out_proj_bias": False}
        if "-" in pattern:
            model["d_intermediate"] = d_intermediate or 4 * d_model
            model["mlp_activation"] = "gelu"
        model["tie_embeddings"] = False
    elif d_intermediate:
        model["d_intermediate"] = d_intermediate
    model["activation_checkpointing"] = False
    return {
        "run_name": f"mamba-{d_model}x{n_layer}",
        "seed": 17,
        "model": model,
        "data": {"local": data, "seq_len": seq_len, "global_batch_size": global_batch_size,
                 "micro_batch_size": micro_batch_size, "num_workers": 8},
        "optimizer": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1},
        "scheduler": {"name": "cosine", "warmup": "0.01dur", "alpha_f": 0.1},
        "precision": "amp_bf16",
        "device": "gpu",
        "fsdp": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE",
                 "backward_prefetch": "BACKWARD_PRE", "activation_checkpointing": False,
                 "limit_all_gathers": True, "state_dict_type": "sharded"},
        "max_duration": f"{int(tokens)}tok",
        "eval_interval": "2000ba",
        "eval_subset_num_batches": 50,
        "grad_clip_norm": 1.0,
        "save_folder": "checkpoints/{run_name}",
        "save_interval": "2000ba",
        "save_num_checkpoints_to_keep": 3,
        "autoresume": True,
        "callbacks": {"speed_monitor": {"window_size": 20}, "lr_monitor": {},
                      "memory_monitor": {}, "runtime_estimator": {}},
        "loggers": {"file": {"filename": "runs/{run_name}/log-rank{rank}.txt"}},
        "log_to_console": True,
        "console_log_interval": "50ba",
        "progress_bar": False,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mamba.make_yaml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, required=True)
    ap.add_argument("--n-layer", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--layer", choices=sorted(LAYERS), default="mamba2")
    ap.add_argument("--pattern", help="hybrid layer pattern, e.g. 'M-M*-' (overrides --n-layer)")
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--d-intermediate", type=int, default=0)
    ap.add_argument("--data", default="runs/data/corpus")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch-size", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tokens", type=float, default=2e10, help="training tokens")
    ap.add_argument("--out", required=True, help="the yaml to write (refuses to overwrite)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; choose another --out or delete it", file=sys.stderr)
        return 2
    cfg = make_config(args.d_model, args.n_layer, args.vocab, args.layer, args.pattern, args.data,
                      args.seq_len, args.global_batch_size, args.micro_batch_size, args.lr,
                      args.tokens, args.ngroups, args.d_intermediate)
    try:
        parsed = parse_config(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = count_parameters(parsed.model.mamba_config())
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {params / 1e6:,.0f}M parameters. Written by: python -m mamba.make_yaml "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}\n")
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    print(f"wrote {out} ({params / 1e6:,.0f}M parameters)")
    return 0


def count_parameters(config: MambaConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    import torch

    from mamba.model import MambaLMHeadModel

    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(main())
