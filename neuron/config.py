"""The trainer's settings: the recipe's YAML (model, data, optimizer, scheduler, seed) and
NxD-style flags on top. Every mistake is a ConfigError: one line, exit 2, before anything runs."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mamba.model import MambaConfig
from mamba.strict import ConfigError
from mamba.train_config import TrainConfig, load_yaml, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "yamls" / "tiny.yaml"
NKI_CHUNK = 128  # the NKI SSD kernel's chunk: sequences are whole chunks
DTYPES = ("float32", "bfloat16")


@dataclass
class Settings:
    config_path: str
    model: MambaConfig
    data: str
    remote: str | None
    seq_len: int
    micro_batch: int
    global_batch: int | None
    grad_accum: int
    tp: int
    zero1: bool
    dtype: str
    max_steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    seed: int
    shuffle: bool
    data_seed: int  # data.shuffle_seed, else seed
    train_split: str
    num_canonical_nodes: int | None
    num_workers: int
    prefetch_factor: int | None
    scheduler: str  # cosine, linear or constant (scheduler.name)
    optimizer: str  # adamw or decoupled_adamw (optimizer.name)
    dist_timeout: float
    checkpoint_dir: str | None
    checkpoint_every: int
    keep_last: int | None
    resume: bool
    init_from: str | None
    activation_checkpointing: bool
    log_every: int
    metrics_file: str | None
    compile_cache: str | None  # compiled graphs kept here for the next run (runtime.use_compile_cache)
    unused_keys: list[str]  # YAML keys of the Composer launcher that mean nothing here (named at start)
    resume_tag: str | None = None  # step_N to resume from (check_resume)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own is usage + message)
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neuron/train.py", description="Train MambaLMHeadModel under neuronx-distributed.",
                allow_abbrev=False)
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                   help="the recipe's YAML (model, data, optimizer, scheduler); default yamls/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the YAML (as mamba/train.py)")
    p.add_argument("--data", help="a data.prepare output folder (default: the YAML's data.local)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--zero1", action="store_true", help="ZeRO-1: optimizer state sharded over DP ranks")
    p.add_argument("--dtype", help="weights: float32 or bfloat16 (fp32 master in ZeRO-1); default from "
                                   "the YAML's precision (fp32 -> float32, amp_bf16 -> bfloat16)")
    p.add_argument("--micro-batch", type=int, help="rows per microbatch (default data.micro_batch_size)")
    p.add_argument("--grad-accum", type=int, help="microbatches per step (default: global batch)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the YAML's max_duration in ba)")
    p.add_argument("--lr", type=float, help="peak learning rate (default optimizer.lr)")
    p.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr (default scheduler.alpha_f)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default scheduler.warmup in ba)")
    p.add_argument("--weight-decay", type=float, help="(default optimizer.weight_decay)")
    p.add_argument("--grad-clip", type=float, help="max grad norm, 0 = off (default grad_clip_norm)")
    p.add_argument("--seed", type=int, help="(default the YAML's seed)")
    p.add_argument("--checkpoint-dir", help="NxD checkpoints here (default runs/RUN_NAME/neuron-checkpoints)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default save_interval)")
    p.add_argument("--keep-last", type=int, help="checkpoints kept (default save_num_checkpoints_to_keep)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint there")
    p.add_argument("--init-from", help="start from a native (save_pretrained / converted) folder")
    p.add_argument("--log-every", type=int, help="steps between log lines (default console_log_interval)")
    p.add_argument("--metrics-file", help="append one JSON line per logged step here")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="keep compiled graphs in DIR and reuse them in later runs (XLA:CPU: torch-xla's "
                        "persistent cache; Trainium: neuronx-cc's --cache_dir)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="not supported: Mamba mixers scan the whole sequence on each rank")
    return p


def _steps(value: str, key: str, total: int | None = None) -> int:
    from mamba.train_config import parse_duration

    amount, unit = parse_duration(value, key)
    if unit == "dur" and total is not None:
        return int(amount * total)
    if unit != "ba":
        raise ConfigError(f"{key}={value!r}: neuron/train.py counts steps; give it in ba (e.g. 100ba) "
                          f"or use the matching flag")
    return int(amount)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{name} {value}: must be {'>= 0' if allow_zero else '> 0'}")


def _check_init_from(folder: str, model: MambaConfig) -> None:
    """A native (save_pretrained / mamba.convert) folder whose architecture is the YAML's model."""
    import json

    path = Path(folder, "config.json")
    if not path.is_file():
        raise ConfigError(f"--init-from {folder}: no config.json there (a save_pretrained / mamba.convert "
                          f"--to native folder)")
    try:
        theirs = MambaConfig.from_dict(json.loads(path.read_text())).to_dict()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--init-from {folder}: {err}") from None
    ours = model.to_dict()
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} in the YAML" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise ConfigError(f"--init-from {folder} has a different architecture ({'; '.join(differ[:3])}); "
                          f"use its model: section")


PRECISION_DTYPES = {"fp32": "float32", "amp_bf16": "bfloat16"}


def _compile_cache(folder: str | None) -> str | None:
    if folder is None:
        return None
    if not folder or (os.path.exists(folder) and not os.path.isdir(folder)):
        raise ConfigError(f"--compile-cache {folder!r}: not a folder; give a folder (made if missing)")
    flags = os.environ.get("NEURON_CC_FLAGS", "")
    given = re.search(r"--cache_dir[= ](\S+)", flags)
    if given and os.path.abspath(given.group(1)) != os.path.abspath(folder):
        raise ConfigError(f"--compile-cache {folder} but NEURON_CC_FLAGS has --cache_dir={given.group(1)}: "
                          f"give one of them")
    return os.path.abspath(folder)


def _dtype(args, cfg: TrainConfig) -> str:
    if args.dtype is not None:
        return args.dtype
    if cfg.precision not in PRECISION_DTYPES:
        raise ConfigError(f"precision={cfg.precision}: neuron/train.py trains in float32 or bfloat16; set "
                          f"precision: amp_bf16 (with --zero1) or fp32, or give --dtype")
    return PRECISION_DTYPES[cfg.precision]


def parse_settings(argv: list[str], world_size: int | None = 1) -> Settings:
    """argv (without the program name) -> Settings, or a one-line ConfigError. world_size None:
    not started by torchrun (no WORLD_SIZE), one process."""
    from neuron.yaml_keys import check_keys

    args = build_parser().parse_args(argv)
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT_CONFIG)
    if args.sequence_parallel:
        raise ConfigError("--sequence-parallel is not supported: each Mamba mixer scans the whole sequence "
                          "on its rank (TP splits heads instead); drop the flag")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype}: must be one of {', '.join(DTYPES)}")
    for name in ("tp", "micro_batch", "grad_accum", "max_steps", "checkpoint_every", "log_every", "lr"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--keep-last", args.keep_last)
    for name in ("warmup_steps", "weight_decay", "grad_clip", "seed", "min_lr_ratio"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=True)
    if args.min_lr_ratio is not None and args.min_lr_ratio > 1:
        raise ConfigError(f"--min-lr-ratio {args.min_lr_ratio}: must be between 0 and 1")
    values = load_yaml(args.config, args.overrides)
    cfg: TrainConfig = parse_config(values)
    unused_keys = check_keys(values, cfg)
    seq_len = cfg.data.seq_len
    if seq_len % NKI_CHUNK:
        raise ConfigError(f"data.seq_len={seq_len}: must be a multiple of {NKI_CHUNK} (the NKI scan chunk), "
                          f"e.g. {max(NKI_CHUNK, seq_len // NKI_CHUNK * NKI_CHUNK)}")
    if args.tp > 1 and world_size is None:
        raise ConfigError(f"--tp {args.tp} needs {args.tp} processes (or a multiple): launch with "
                          f"torchrun --nproc_per_node {args.tp} neuron/train.py ...")
    world_size = world_size or 1
    if args.tp > 1 and world_size % args.tp:
        raise ConfigError(f"--tp {args.tp} does not divide the world size {world_size}")
    dp = max(1, world_size // args.tp)
    micro = args.micro_batch or cfg.data.micro_batch_size
    if args.grad_accum is not None:
        accum, global_batch = args.grad_accum, None
    else:
        global_batch = cfg.data.global_batch_size
        if global_batch % (micro * dp):
            raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of micro batch "
                              f"{micro} x data-parallel ranks {dp}; change it or give --grad-accum")
        accum = global_batch // (micro * dp)
    dtype = _dtype(args, cfg)
    if dtype == "bfloat16" and not args.zero1:
        given = "--dtype bfloat16" if args.dtype else f"precision={cfg.precision} (bfloat16)"
        raise ConfigError(f"{given} needs --zero1 (its optimizer keeps the fp32 master weights)")
    if args.max_steps is not None:
        max_steps = args.max_steps
    elif cfg.max_duration is not None:
        max_steps = _steps(cfg.max_duration, "max_duration")
    else:
        raise ConfigError("the YAML gives data.n_total_tokens, not max_duration: give --max-steps")
    data = args.data or cfg.data.local
    model = cfg.model.mamba_config()
    init_from = args.init_from or cfg.model.init_from
    if init_from:
        _check_init_from(init_from, model)
    checkpoint_dir = args.checkpoint_dir or os.path.join("runs", cfg.run_name, "neuron-checkpoints")
    if args.resume and not args.checkpoint_dir and not os.path.isdir(checkpoint_dir):
        raise ConfigError(f"--resume: no checkpoints in {checkpoint_dir}; give --checkpoint-dir")
    keep = args.keep_last if args.keep_last is not None else cfg.save_num_checkpoints_to_keep
    return Settings(
        config_path=args.config, model=model, data=data, remote=cfg.data.remote,
        seq_len=seq_len,
        micro_batch=micro, global_batch=global_batch, grad_accum=accum, tp=args.tp, zero1=args.zero1,
        dtype=dtype, max_steps=max_steps, lr=args.lr or cfg.optimizer.lr,
        min_lr_ratio=cfg.scheduler.alpha_f if args.min_lr_ratio is None else args.min_lr_ratio,
        warmup_steps=(args.warmup_steps if args.warmup_steps is not None
                      else _steps(cfg.scheduler.warmup, "scheduler.warmup", max_steps)),
        betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay if args.weight_decay is None else args.weight_decay,
        grad_clip=cfg.grad_clip_norm if args.grad_clip is None else args.grad_clip,
        seed=cfg.seed if args.seed is None else args.seed, shuffle=cfg.data.shuffle,
        data_seed=(cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None
                   else cfg.seed if args.seed is None else args.seed),
        train_split=cfg.data.train_split, num_canonical_nodes=cfg.data.num_canonical_nodes,
        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
        scheduler=cfg.scheduler.name, optimizer=cfg.optimizer.name, dist_timeout=cfg.dist_timeout,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every or _steps(cfg.save_interval, "save_interval"),
        keep_last=None if keep in (-1, 0) else keep, resume=args.resume, init_from=init_from,
        activation_checkpointing=cfg.model.activation_checkpointing,
        log_every=args.log_every or max(1, _steps(cfg.console_log_interval, "console_log_interval",
                                                  max_steps)),
        metrics_file=args.metrics_file, compile_cache=_compile_cache(args.compile_cache),
        unused_keys=unused_keys)


def check_resume(s: Settings) -> str | None:
    """--resume: the newest completed checkpoint in s.checkpoint_dir, written with this run's --tp,
    model and optimizer sharding (else a one-line ConfigError, before any model is built)."""
    from mamba.interop.neuron import latest_tag, read_user_content

    if not s.resume:
        return None
    tag = latest_tag(s.checkpoint_dir)
    if tag is None:
        raise ConfigError(f"--resume: no completed checkpoint (step_N with a done file) in "
                          f"{s.checkpoint_dir}")
    where = os.path.join(s.checkpoint_dir, tag)
    try:
        content = read_user_content(where)
        theirs = MambaConfig.from_dict(content["model_config"]).to_dict()
    except (ValueError, TypeError, OSError, KeyError) as err:
        raise ConfigError(f"--resume: {err}") from None
    restart = (f"; or start a new run from its weights: python -m mamba.convert --from neuron {where} "
               f"--to native DIR, then --init-from DIR")
    tp = int(content.get("tp", 1))
    if tp != s.tp:
        raise ConfigError(f"--resume: {where} was trained with --tp {tp}, this run has --tp {s.tp}; "
                          f"resume with --tp {tp}{restart}")
    ours = s.model.to_dict()
    differ = [f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise ConfigError(f"--resume: {where} holds another model ({'; '.join(differ[:3])}); resume with "
                          f"its model: section{restart}")
    zero1 = content.get("zero1")
    if zero1 is not None and bool(zero1) != s.zero1:
        flag = "with --zero1" if zero1 else "without --zero1"
        raise ConfigError(f"--resume: {where} was trained {flag} (its optimizer state is sharded "
                          f"{'over' if zero1 else 'not over'} data-parallel ranks); resume {flag}{restart}")
    return tag
