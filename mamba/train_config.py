"""The training configuration: YAML + `variables:` interpolation + CLI dotlist overrides,
checked strictly into typed dataclasses (an unknown or misspelt key anywhere is an error
naming its path and the nearest valid key; Composer itself would silently accept typos in
its FSDP config). No Composer import here: this module is testable on its own."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mamba.model import MambaConfig
from mamba.strict import ConfigError, build

DURATION = re.compile(r"^\d+(\.\d+)?(e\d+)?(ba|ep|tok|sp|dur)$")
LAYOUT_MAX_SEQ_LEN = {"int32": 16384, "int64": 2 ** 30}


@dataclass
class ModelSection:
    """MambaConfig fields (state-spaces names) plus how the recipe treats the model."""

    vocab_size: int
    d_model: int
    n_layer: int
    layer_pattern: str | None = None
    d_intermediate: int = 0
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    mlp_activation: Literal["swiglu", "gelu", "relu2"] = "swiglu"
    norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    fsdp_layer_wrap: bool = True  # each block is its own FSDP unit
    activation_checkpointing: bool = False  # recompute each block in backward
    init_from: str | None = None  # a save_pretrained / converted folder to start from

    def mamba_config(self) -> MambaConfig:
        keys = set(MambaConfig.__dataclass_fields__) - {"fused_add_norm"}
        try:
            return MambaConfig(**{k: getattr(self, k) for k in keys})
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


@dataclass
class DataSection:
    local: str  # a data.prepare output folder (or the per-node cache when remote is set)
    global_batch_size: int
    micro_batch_size: int
    seq_len: int
    remote: str | None = None  # s3://, gs://, oci://, or a shared folder
    train_split: str = "train"
    eval_split: str | None = "val"
    eval_batch_size: int | None = None
    num_workers: int = 0
    prefetch_factor: int | None = 2
    shuffle: bool = True
    shuffle_seed: int | None = None  # defaults to the run's seed
    num_canonical_nodes: int | None = None
    n_total_tokens: int | None = None  # train for this many tokens (instead of max_duration)


@dataclass
class OptimizerSection:
    name: Literal["adamw", "decoupled_adamw"] = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # never applied to A_log, D, dt_bias, norms, biases


@dataclass
class SchedulerSection:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: str = "0ba"  # a Composer duration: 100ba, 0.05dur, 1000000tok
    alpha_f: float = 0.1  # final lr = alpha_f * lr


@dataclass
class FSDPSection:
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NONE"] = "BACKWARD_POST"
    activation_checkpointing: bool = False
    activation_checkpointing_reentrant: bool = False
    limit_all_gathers: bool = True
    cpu_offload: bool = False
    state_dict_type: Literal["full", "sharded"] = "full"
    sync_module_states: bool = False
    use_orig_params: bool = True
    forward_prefetch: bool = False
    verbose: bool = False


@dataclass
class ConsoleLogger:
    log_interval: str = "10ba"


@dataclass
class FileLogger:
    filename: str = "runs/{run_name}/log-rank{rank}.txt"  # Composer fills {run_name}, {rank}
    overwrite: bool = True


@dataclass
class WandBLogger:
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class MLFlowLogger:
    experiment_name: str | None = None
    tracking_uri: str | None = None
    run_name: str | None = None


@dataclass
class TensorBoardLogger:
    log_dir: str | None = None


@dataclass
class LoggersSection:
    console: ConsoleLogger | None = None
    file: FileLogger | None = None
    wandb: WandBLogger | None = None
    mlflow: MLFlowLogger | None = None
    tensorboard: TensorBoardLogger | None = None


@dataclass
class SpeedMonitorCallback:
    window_size: int = 10


@dataclass
class EmptyCallback:
    pass


@dataclass
class LossCurveCallback:
    filename: str = "loss_curve.png"  # relative to save_folder


@dataclass
class CallbacksSection:
    speed_monitor: SpeedMonitorCallback | None = None
    lr_monitor: EmptyCallback | None = None
    memory_monitor: EmptyCallback | None = None
    runtime_estimator: EmptyCallback | None = None
    loss_curve: LossCurveCallback | None = None


@dataclass
class SampleSection:
    """Generate from the trained model at the end (the main job prints this)."""

    prompt: str = "The"
    max_new_tokens: int = 64
    temperature: float = 0.0


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    run_name: str = "mamba"
    seed: int = 17
    variables: dict = field(default_factory=dict)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    fsdp: FSDPSection | None = None
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    max_duration: str | None = None
    eval_interval: str = "500ba"
    eval_subset_num_batches: int = -1
    grad_clip_norm: float = 1.0  # <= 0 disables clipping
    save_folder: str | None = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    export_folder: str | None = None  # save_pretrained folder written at the end
    loggers: LoggersSection = field(default_factory=LoggersSection)
    callbacks: CallbacksSection = field(default_factory=CallbacksSection)
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "10ba"
    dist_timeout: float = 600.0
    sample: SampleSection | None = None


def load_yaml(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """YAML file + dotlist overrides, `${variables.x}` resolved; a plain dict out."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        cfg = OmegaConf.load(path)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. optimizer.lr=1e-3)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # a YAML syntax error
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(container, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return container


def parse_config(values: dict[str, Any]) -> TrainConfig:
    cfg = build(TrainConfig, values, "config")
    cfg.model.mamba_config()  # model rules (divisibility, pattern) checked now, not mid-launch
    for name in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
        _check_duration(getattr(cfg, name), name)
    _check_duration(cfg.scheduler.warmup, "scheduler.warmup")
    if (cfg.max_duration is None) == (cfg.data.n_total_tokens is None):
        raise ConfigError("give exactly one of max_duration (e.g. 1000ba) or data.n_total_tokens")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas={cfg.optimizer.betas}: expected two numbers")
    for name in ("global_batch_size", "micro_batch_size", "seq_len"):
        if getattr(cfg.data, name) <= 0:
            raise ConfigError(f"data.{name}={getattr(cfg.data, name)}: must be positive")
    if cfg.autoresume and not cfg.save_folder:
        raise ConfigError("autoresume: true needs save_folder (where checkpoints are found)")
    return cfg


def _check_duration(value: str | None, name: str) -> None:
    if value is not None and not DURATION.match(value):
        raise ConfigError(f"{name}={value!r}: expected a duration like 1000ba, 1ep, 2e9tok or 0.1dur")


def derived_batching(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device batch size, gradient accumulation steps); errors say which numbers disagree."""
    d = cfg.data
    if d.global_batch_size % world_size:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not divisible by the "
                          f"world size {world_size}")
    per_device = d.global_batch_size // world_size
    if per_device % d.micro_batch_size:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} / world size {world_size} = "
                          f"{per_device} per device is not divisible by data.micro_batch_size="
                          f"{d.micro_batch_size}")
    return per_device, per_device // d.micro_batch_size


def check_data(cfg: TrainConfig) -> Any:
    """The shards exist and agree with the config (layout, seq_len, vocabulary)."""
    from data.dataset import load_shard_meta, split_paths
    from data.errors import DataError

    d = cfg.data
    if d.remote is None and not os.path.isdir(d.local):
        raise ConfigError(f"data.local={d.local!r} does not exist: prepare it with "
                          f"`python -m data.prepare --input ... --output {d.local}` or set data.remote")
    local, remote = split_paths(d.local, d.remote, d.train_split)
    try:
        meta = load_shard_meta(local, remote)
    except DataError as err:
        raise ConfigError(f"data: {err}") from None
    limit = LAYOUT_MAX_SEQ_LEN.get(meta.layout, 0)
    if d.seq_len > limit:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds the {meta.layout} DataLayout limit "
                          f"{limit}; re-prepare with --layout int64")
    if d.seq_len != meta.seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} but the shards in {local} hold rows of "
                          f"{meta.seq_len}; set data.seq_len={meta.seq_len} or re-prepare")
    if meta.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the shards' "
                          f"tokenizer vocabulary {meta.vocab_size} ({meta.tokenizer})")
    if d.eval_split:
        eval_local, eval_remote = split_paths(d.local, d.remote, d.eval_split)
        if eval_remote is None and not os.path.isdir(eval_local):
            raise ConfigError(f"data.eval_split={d.eval_split!r}: {eval_local} does not exist; "
                              f"set data.eval_split=null to train without evaluation")
    return meta
