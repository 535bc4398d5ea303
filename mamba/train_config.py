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
from mamba.strict import ConfigError, bounded, build

DURATION = re.compile(r"^(\d+(?:\.\d+)?(?:e\d+)?)(ba|ep|tok|sp|dur)$")
SEED_MAX = 2 ** 32 - 1  # numpy and streaming take 32-bit seeds
LAYOUT_MAX_SEQ_LEN = {"int32": 16384, "int64": 2 ** 30}


@dataclass
class ModelSection:
    """MambaConfig fields (state-spaces names) plus how the recipe treats the model."""

    vocab_size: int = bounded(ge=1)
    d_model: int = bounded(ge=1)
    n_layer: int = bounded(ge=1)
    layer_pattern: str | None = None
    d_intermediate: int = bounded(0, ge=0)
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = bounded(8, ge=1)
    tie_embeddings: bool = True
    mlp_activation: Literal["swiglu", "gelu", "relu2"] = "swiglu"
    norm_epsilon: float = bounded(1e-5, gt=0)
    initializer_range: float = bounded(0.02, gt=0)
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
    global_batch_size: int = bounded(ge=1)
    micro_batch_size: int = bounded(ge=1)
    seq_len: int = bounded(ge=1)
    remote: str | None = None  # s3://, gs://, oci://, or a shared folder
    train_split: str = "train"
    eval_split: str | None = "val"
    eval_batch_size: int | None = bounded(None, ge=1)
    num_workers: int = bounded(0, ge=0)
    prefetch_factor: int | None = bounded(2, ge=1)
    shuffle: bool = True
    shuffle_seed: int | None = bounded(None, ge=0, le=SEED_MAX)  # defaults to the run's seed
    num_canonical_nodes: int | None = bounded(None, ge=1)
    n_total_tokens: int | None = bounded(None, ge=1)  # train for this many tokens (instead of max_duration)


@dataclass
class OptimizerSection:
    name: Literal["adamw", "decoupled_adamw"] = "adamw"
    lr: float = bounded(3e-4, gt=0)
    betas: list[float] | None = bounded(None, ge=0, lt=1)  # [0.9, 0.95] unless beta1/beta2 say otherwise
    beta1: float | None = bounded(None, ge=0, lt=1)  # the original Composer Mamba recipe's spelling
    beta2: float | None = bounded(None, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    weight_decay: float = bounded(0.1, ge=0)  # never applied to A_log, D, dt_bias, norms, biases


@dataclass
class SchedulerSection:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: str = "0ba"  # a Composer duration: 100ba, 0.05dur, 1000000tok
    alpha_f: float = bounded(0.1, ge=0, le=1)  # final lr = alpha_f * lr


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
    process_group: Any = None  # the original recipe's key: only null (the default group) is accepted


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
    window_size: int = bounded(10, ge=1)


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
    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(0.0, ge=0)
    # cut the sample at the first of these strings (EOS always stops it); unset: a newline when
    # the prompt ends like data.prepare's qa template ("...\nAnswer:"), so the answer ends there
    stop: list[str] | None = None


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    run_name: str = "mamba"
    seed: int = bounded(17, ge=0, le=SEED_MAX)
    variables: dict = field(default_factory=dict)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    fsdp: FSDPSection | None = None
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    max_duration: str | None = None
    eval_interval: str = "500ba"
    eval_subset_num_batches: int = bounded(-1, ge=1, also=(-1,), hint="the whole eval split")
    grad_clip_norm: float = bounded(1.0, ge=0)  # 0 disables clipping
    save_folder: str | None = None  # "{run_name}" in it (and in export_folder) is the run's name
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = bounded(-1, ge=0, also=(-1,), hint="keep all")
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    export_folder: str | None = None  # save_pretrained folder written at the end, e.g. runs/{run_name}/model
    loggers: LoggersSection = field(default_factory=LoggersSection)
    callbacks: CallbacksSection = field(default_factory=CallbacksSection)
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "10ba"
    dist_timeout: float = bounded(600.0, gt=0)
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
    """Every key, type and range checked; the first mistake raised as a one-line ConfigError."""
    cfg = build(TrainConfig, values, "config")
    _check_model_sizes(cfg.model)
    cfg.model.mamba_config()  # model rules (divisibility, pattern) checked now, not mid-launch
    _check_durations(cfg)
    _resolve_betas(cfg.optimizer)
    if cfg.fsdp is not None and cfg.fsdp.process_group is not None:
        raise ConfigError(f"fsdp.process_group={cfg.fsdp.process_group!r}: only null (the default "
                          f"process group: all ranks) is supported; remove the key or set it to null")
    # per-run folders: concurrent runs of one config under different run names (slurm.sh names
    # each job's run) must not write into one another's checkpoints or exported model
    for key in ("save_folder", "export_folder"):
        if getattr(cfg, key):
            setattr(cfg, key, getattr(cfg, key).replace("{run_name}", cfg.run_name))
    if cfg.autoresume and not cfg.save_folder:
        raise ConfigError("autoresume: true needs save_folder (where checkpoints are found)")
    if cfg.sample is not None and not cfg.sample.prompt:
        raise ConfigError("sample.prompt='': give a prompt to continue (or remove the sample section)")
    return cfg


def _resolve_betas(o: OptimizerSection) -> None:
    """`betas: [b1, b2]` or the original recipe's `beta1` / `beta2`, not both."""
    if o.betas is not None:
        if o.beta1 is not None or o.beta2 is not None:
            given = "optimizer.beta1" if o.beta1 is not None else "optimizer.beta2"
            raise ConfigError(f"optimizer.betas={o.betas} and {given} both set: give either "
                              f"betas: [beta1, beta2] or beta1/beta2, not both")
        if len(o.betas) != 2:
            raise ConfigError(f"optimizer.betas={o.betas}: expected two numbers, e.g. [0.9, 0.95]")
    else:
        o.betas = [0.9 if o.beta1 is None else o.beta1, 0.95 if o.beta2 is None else o.beta2]


# ssm_cfg / attn_cfg sizes the model code divides or loops by (MambaConfig checks divisibility)
POSITIVE_SIZES = {"ssm_cfg": ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"),
                  "attn_cfg": ("num_heads", "num_heads_kv", "head_dim")}


def _check_model_sizes(model: ModelSection) -> None:
    for section, keys in POSITIVE_SIZES.items():
        values = getattr(model, section)
        for key in keys:
            v = values.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"model.{section}.{key}={v!r}: must be an integer >= 1")
    ssm = model.ssm_cfg
    for key in ("dt_min", "dt_max", "dt_init_floor"):
        v = ssm.get(key)
        if v is not None and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ConfigError(f"model.ssm_cfg.{key}={v!r}: must be a number > 0")
    if ssm.get("dt_min") is not None and ssm.get("dt_max") is not None and ssm["dt_min"] > ssm["dt_max"]:
        raise ConfigError(f"model.ssm_cfg.dt_min={ssm['dt_min']} > dt_max={ssm['dt_max']}: "
                          f"dt_min must not exceed dt_max")


def parse_duration(value: str, name: str) -> tuple[float, str]:
    """(amount, unit) of a Composer duration string; ba/ep/tok/sp must be whole numbers."""
    m = DURATION.match(value)
    if not m:
        raise ConfigError(f"{name}={value!r}: expected a duration like 1000ba, 1ep, 2e9tok or 0.1dur")
    amount, unit = float(m.group(1)), m.group(2)
    if unit != "dur" and not amount.is_integer():
        raise ConfigError(f"{name}={value!r}: {unit} counts must be whole numbers")
    return amount, unit


def _check_durations(cfg: TrainConfig) -> None:
    if (cfg.max_duration is None) == (cfg.data.n_total_tokens is None):
        raise ConfigError("give exactly one of max_duration (e.g. 1000ba) or data.n_total_tokens")
    intervals = {"eval_interval": cfg.eval_interval, "save_interval": cfg.save_interval,
                 "console_log_interval": cfg.console_log_interval}
    if cfg.loggers.console is not None:
        intervals["loggers.console.log_interval"] = cfg.loggers.console.log_interval
    for name, value in intervals.items():
        amount, unit = parse_duration(value, name)
        if amount <= 0 or (unit == "dur" and amount > 1):
            rule = "between 0 and 1 (a fraction of the run)" if unit == "dur" else "at least 1"
            raise ConfigError(f"{name}={value!r}: must be {rule}")
    if cfg.max_duration is not None:
        total = parse_duration(cfg.max_duration, "max_duration")
        if total[1] == "dur":
            raise ConfigError(f"max_duration={cfg.max_duration!r}: give the length itself, e.g. 1000ba, "
                              f"1ep or 2e9tok (dur is a fraction of max_duration)")
        if total[0] <= 0:
            raise ConfigError(f"max_duration={cfg.max_duration!r}: must be at least 1")
    else:
        total = (float(cfg.data.n_total_tokens), "tok")
    warmup = parse_duration(cfg.scheduler.warmup, "scheduler.warmup")
    if warmup[1] == "dur":
        if warmup[0] > 1:
            raise ConfigError(f"scheduler.warmup={cfg.scheduler.warmup!r}: a fraction of the run "
                              f"must be at most 1dur")
        return
    per = {"tok": 1, "sp": cfg.data.seq_len, "ba": cfg.data.global_batch_size * cfg.data.seq_len}
    if warmup[1] == total[1]:
        longer = warmup[0] > total[0]
    elif warmup[1] in per and total[1] in per:  # compare in tokens (every position counts)
        longer = warmup[0] * per[warmup[1]] > total[0] * per[total[1]]
    else:  # epochs against another unit: the data's size decides, unknown here
        longer = False
    if longer:
        length = cfg.max_duration or f"data.n_total_tokens={cfg.data.n_total_tokens}"
        raise ConfigError(f"scheduler.warmup={cfg.scheduler.warmup!r} is longer than the run ({length}): "
                          f"shorten it (e.g. 0.05dur) or train longer")


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
