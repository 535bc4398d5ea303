"""Train a Mamba-family LM with Composer.

    composer -n N mamba/train.py [yamls/x.yaml] [key=value ...]
    python mamba/train.py [yamls/x.yaml] [key=value ...]          (one process)
    python mamba/train.py [yamls/x.yaml] [key=value ...] --check  (check only: no training)

Without a config file the embedded default, yamls/tiny.yaml, is used (and named). One of only
two files that import Composer (with mamba/composer_model.py); `--check` never imports it. A
configuration mistake exits with code 2 and one line on stderr, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the composer launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# OpenMP reads its wait policy once, when torch loads it. Passive: a worker thread with nothing
# to do sleeps instead of spinning, so on a busy machine it does not take CPU time from the
# threads doing the work (bench/bench_threads.py). A user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mamba.strict import ConfigError  # noqa: E402
from mamba.train_config import (  # noqa: E402
    SampleSection,
    TrainConfig,
    check_data,
    derived_batching,
    load_yaml,
    parse_config,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "yamls" / "tiny.yaml"
USAGE = ("usage: composer -n N mamba/train.py [CONFIG.yaml] [key=value ...]  "
         "(or python mamba/train.py ...; add --check to check the config without training)")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(cfg: TrainConfig) -> str:
    device = cfg.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device=gpu but CUDA is not available; use device=cpu")
    if device == "cpu" and cfg.precision != "fp32":
        raise ConfigError(f"precision={cfg.precision} on CPU: CPU training must be fp32")
    return device


def choose_fsdp2(cfg: TrainConfig, device: str) -> bool:
    """True when this run must set FSDP_VERSION=2 itself: an fsdp section on CPU, where Composer's
    default FSDP (1) needs CUDA, and the user did not choose a version."""
    if cfg.fsdp is None or device != "cpu":
        return False
    version = os.environ.get("FSDP_VERSION")
    if version not in (None, "", "2"):
        raise ConfigError(f"fsdp on CPU with FSDP_VERSION={version}: Composer's FSDP {version} needs CUDA; "
                          f"unset FSDP_VERSION (FSDP2 is then chosen) or set FSDP_VERSION=2")
    return version != "2"


@dataclass
class Args:
    config: str
    overrides: list[str]
    check: bool = False  # --check: validate everything, train nothing
    default: bool = False  # no config given: the embedded default


def parse_args(argv: list[str]) -> Args:
    """[CONFIG] [key=value ...] with --check anywhere. Only the exact word --check is the flag
    (an override always holds '=', so `run_name=--check` stays an override); any other word
    starting with '-' is an error, not an override."""
    check = "--check" in argv
    words = [a for a in argv if a != "--check"]
    for word in words:
        if word.startswith("-"):
            raise ConfigError(f"unknown option {word!r}; {USAGE}")
    if words and not ("=" in words[0] and not os.path.isfile(words[0])):
        return Args(words[0], words[1:], check)
    return Args(str(DEFAULT_CONFIG), words, check, default=True)


def prepare(argv: list[str]) -> tuple[TrainConfig, dict]:
    """Everything that can fail because of the user's config, checked before any output."""
    args = parse_args(argv)
    cfg = parse_config(load_yaml(args.config, args.overrides))
    per_device, accum = derived_batching(cfg, world_size())
    meta = check_data(cfg)
    device = resolve_device(cfg)
    fsdp2 = choose_fsdp2(cfg, device)
    if cfg.model.init_from and not Path(cfg.model.init_from, "config.json").is_file():
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: no config.json there")
    return cfg, dict(per_device=per_device, accum=accum, meta=meta, device=device, args=args,
                     choose_fsdp2=fsdp2)


def check_summary(cfg: TrainConfig, derived: dict) -> str:
    """The one line `--check` prints: what would train, on what, for how long."""
    from mamba.make_yaml import count_parameters

    args, m, d = derived["args"], cfg.model, cfg.data
    config = cfg.model.mamba_config()
    layers = "".join(config.layer_kinds())
    length = cfg.max_duration or f"{d.n_total_tokens}tok"
    return (f"ok: {args.config}{' (the default config)' if args.default else ''}: "
            f"{m.n_layer} layers {layers}, d_model {m.d_model}, {count_parameters(config) / 1e6:.1f}M "
            f"parameters; {length} of {d.global_batch_size} x {d.seq_len} tokens ({world_size()} rank(s) x "
            f"{derived['accum']} microbatch(es) of {d.micro_batch_size}); data {d.local} "
            f"({derived['meta'].tokenizer} tokenizer); device {derived['device']}")


def fsdp_settings(cfg: TrainConfig) -> dict | None:
    if cfg.fsdp is None:
        return None
    f = cfg.fsdp
    checkpointing = f.activation_checkpointing or cfg.model.activation_checkpointing
    if os.environ.get("FSDP_VERSION") == "2":  # FSDP2 takes a smaller set of options
        return {"activation_checkpointing": checkpointing,
                "mixed_precision": f.mixed_precision, "state_dict_type": f.state_dict_type,
                "reshard_after_forward": f.sharding_strategy != "SHARD_GRAD_OP",
                "verbose": f.verbose}
    return {"sharding_strategy": f.sharding_strategy, "mixed_precision": f.mixed_precision,
            "backward_prefetch": f.backward_prefetch,
            "activation_checkpointing": checkpointing,
            "activation_checkpointing_reentrant": f.activation_checkpointing_reentrant,
            "limit_all_gathers": f.limit_all_gathers, "cpu_offload": f.cpu_offload,
            "state_dict_type": f.state_dict_type, "sync_module_states": f.sync_module_states,
            "use_orig_params": f.use_orig_params, "forward_prefetch": f.forward_prefetch,
            "verbose": f.verbose}


def build_model(cfg: TrainConfig):
    from mamba.composer_model import ComposerMamba
    from mamba.model import MambaLMHeadModel

    config = cfg.model.mamba_config()
    inner = None
    if cfg.model.init_from:
        inner = MambaLMHeadModel.from_pretrained(cfg.model.init_from)
        theirs, ours = inner.config.to_dict(), config.to_dict()
        diff = [k for k in ours if k not in ("initializer_range",) and ours[k] != theirs.get(k)]
        if diff:
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} has a different architecture: "
                              + ", ".join(f"{k}={theirs.get(k)!r} there vs {ours[k]!r} here"
                                          for k in diff[:4]))
    checkpointing = cfg.model.activation_checkpointing or bool(cfg.fsdp and cfg.fsdp.activation_checkpointing)
    model = ComposerMamba(config, cfg.model.fsdp_layer_wrap, checkpointing, model=inner)
    if checkpointing and cfg.fsdp is None:
        from mamba.composer_model import apply_block_checkpointing

        apply_block_checkpointing(model.model)
    return model


def build_optimizer(cfg: TrainConfig, model):
    from composer.optim import DecoupledAdamW

    from mamba.model import no_weight_decay_names

    skip = no_weight_decay_names(model.model)
    decay = [p for n, p in model.model.named_parameters() if n not in skip]
    no_decay = [p for n, p in model.model.named_parameters() if n in skip]
    o = cfg.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if o.name == "adamw" else DecoupledAdamW
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def build_scheduler(cfg: TrainConfig):
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    s = cfg.scheduler
    if s.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=s.warmup, alpha_f=s.alpha_f)
    if s.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=s.warmup, alpha_f=s.alpha_f)
    return ConstantWithWarmupScheduler(t_warmup=s.warmup)


def build_dataspec(local: str, remote: str | None, split: str | None, *, batch_size: int, **loader_kwargs):
    """data.dataset's loader wrapped in a Composer DataSpec that counts tokens (here, not in
    `data`, which must not import Composer)."""
    from composer.core import DataSpec

    from data.dataset import build_dataloader, count_samples, count_tokens

    loader = build_dataloader(local, remote, split, batch_size=batch_size, **loader_kwargs)
    return DataSpec(loader, get_num_tokens_in_batch=count_tokens, get_num_samples_in_batch=count_samples)


def build_dataloaders(cfg: TrainConfig, per_device: int):
    from composer.core import Evaluator

    d = cfg.data
    common = dict(num_workers=d.num_workers, prefetch_factor=d.prefetch_factor,
                  num_canonical_nodes=d.num_canonical_nodes)
    train = build_dataspec(d.local, d.remote, d.train_split, batch_size=per_device, shuffle=d.shuffle,
                           seed=d.shuffle_seed if d.shuffle_seed is not None else cfg.seed, **common)
    evaluator = None
    if d.eval_split:
        eval_spec = build_dataspec(d.local, d.remote, d.eval_split, shuffle=False, drop_last=False,
                                   batch_size=d.eval_batch_size or d.micro_batch_size, **common)
        evaluator = Evaluator(label="eval", dataloader=eval_spec,
                              metric_names=["LanguageCrossEntropy", "LanguagePerplexity",
                                            "TokenAccuracy"])
    return train, evaluator


def build_loggers(cfg: TrainConfig) -> list:
    from composer.loggers import FileLogger, MLFlowLogger, TensorboardLogger, WandBLogger

    lg, out = cfg.loggers, []
    if lg.file:
        out.append(FileLogger(filename=lg.file.filename, overwrite=lg.file.overwrite))
    if lg.wandb:
        out.append(WandBLogger(project=lg.wandb.project, entity=lg.wandb.entity, name=lg.wandb.name,
                               group=lg.wandb.group, tags=lg.wandb.tags or None))
    if lg.mlflow:
        out.append(MLFlowLogger(experiment_name=lg.mlflow.experiment_name,
                                tracking_uri=lg.mlflow.tracking_uri, run_name=lg.mlflow.run_name))
    if lg.tensorboard:
        out.append(TensorboardLogger(log_dir=lg.tensorboard.log_dir))
    return out


def build_callbacks(cfg: TrainConfig) -> list:
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor

    c, out = cfg.callbacks, []
    if c.speed_monitor:
        out.append(SpeedMonitor(window_size=c.speed_monitor.window_size))
    if c.lr_monitor:
        out.append(LRMonitor())
    if c.memory_monitor:
        out.append(MemoryMonitor())
    if c.runtime_estimator:
        out.append(RuntimeEstimator())
    if c.loss_curve and cfg.save_folder:
        out.append(make_loss_curve(os.path.join(cfg.save_folder, c.loss_curve.filename)))
    return out


def make_loss_curve(path: str):
    """A callback that records the training loss and writes it as a PNG at the end."""
    from composer.core import Callback
    from composer.utils import dist

    class LossCurve(Callback):
        def __init__(self):
            self.steps: list[int] = []
            self.losses: list[float] = []
            self.times: list[float] = []  # wall clock at each batch end (bench/bench_recipe.py)

        def batch_end(self, state, logger) -> None:
            # total_loss_dict holds the loss averaged over ranks (state.loss is this rank's)
            value = state.total_loss_dict.get("loss/train/total")
            if value is not None:
                self.steps.append(int(state.timestamp.batch))
                self.losses.append(float(value))
                self.times.append(time.time())

        def state_dict(self) -> dict:  # resumed runs keep the early part of the curve
            return {"steps": self.steps, "losses": self.losses, "times": self.times}

        def load_state_dict(self, state: dict) -> None:
            self.steps, self.losses = list(state["steps"]), list(state["losses"])
            self.times = list(state.get("times", []))

        def fit_end(self, state, logger) -> None:
            if dist.get_global_rank() != 0 or not self.steps:
                return
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(self.steps, self.losses, lw=1)
            ax.set_xlabel("batch")
            ax.set_ylabel("training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump({"batch": self.steps, "loss": self.losses, "time": self.times}, f)
            print(f"loss curve: {path}")

    return LossCurve()


def latest_checkpoint(cfg: TrainConfig) -> str | None:
    """Autoresume's lookup, done here on global rank 0 and broadcast (collective: every rank calls it).
    Composer 0.32.1's own lookup has local rank 0 of every node write and then delete a signal file
    in save_folder whose name comes from global rank 0 (`._signal_file_node0_...`): on a save folder
    shared by several nodes (the multi-node setup) the second node's delete fails with
    FileNotFoundError (composer PR 2363, open). Renaming that file per node would mean patching
    Composer's internals; this lookup needs no file at all, and the Trainer then loads the path
    like any load_path (through a per-node temporary folder). The symlink Composer writes,
    latest-rank0.pt, points at the newest complete checkpoint (a file, or a folder when sharded)."""
    from composer.utils import dist, format_name_with_dist

    found = [None]
    if dist.get_global_rank() == 0:
        latest = os.path.join(format_name_with_dist(cfg.save_folder, cfg.run_name), "latest-rank0.pt")
        if os.path.exists(latest):  # a dangling link (its target deleted) is no checkpoint
            found[0] = os.path.realpath(latest)
    dist.broadcast_object_list(found, src=0)
    return found[0]


CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)(?:-rank\d+\.pt)?$")  # Composer's file / sharded folder


def prune_checkpoints(folder: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints in `folder` (by batch); the one latest-rank0.pt
    points at always stays. Only names of Composer's default pattern are touched
    (ep{epoch}-ba{batch}-rank{rank}.pt files, ep{epoch}-ba{batch} sharded folders). Returns the
    names deleted. Composer's save_num_checkpoints_to_keep only prunes what the running process
    wrote: checkpoints from before a requeue stayed forever."""
    if keep < 1 or not os.path.isdir(folder):
        return []
    by_time: dict[tuple[int, int], list[str]] = {}
    for name in os.listdir(folder):
        m = CHECKPOINT_NAME.match(name)
        if m and (name.endswith(".pt") or os.path.isdir(os.path.join(folder, name))):
            by_time.setdefault((int(m.group(2)), int(m.group(1))), []).append(name)
    latest = os.path.join(folder, "latest-rank0.pt")
    protected = os.path.realpath(latest) if os.path.lexists(latest) else None
    deleted = []
    for key in sorted(by_time)[:-keep]:
        paths = [os.path.join(folder, n) for n in by_time[key]]
        if protected and any(os.path.realpath(p) == protected for p in paths):
            continue
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            deleted.append(os.path.basename(path))
    return deleted


def make_checkpoint_pruner(save_folder: str, keep: int):
    """A callback for resumed runs: after each checkpoint and at the end, global rank 0 prunes
    save_folder to the newest `keep` checkpoints, those of the runs before the requeue included."""
    from composer.core import Callback
    from composer.utils import dist, format_name_with_dist

    class PruneCheckpoints(Callback):
        def _prune(self, state) -> None:
            if dist.get_global_rank() == 0:
                folder = format_name_with_dist(save_folder, state.run_name)
                for name in prune_checkpoints(folder, keep):
                    print(f"removed old checkpoint {os.path.join(folder, name)} "
                          f"(save_num_checkpoints_to_keep={keep})")

        def batch_checkpoint(self, state, logger) -> None:
            self._prune(state)

        def epoch_checkpoint(self, state, logger) -> None:
            self._prune(state)

        def fit_end(self, state, logger) -> None:
            self._prune(state)

    return PruneCheckpoints()


def full_state_dict(model) -> dict:
    """The unsharded weights on CPU, whatever FSDP did (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


MMAP_FREES_MIN_PARAMS = 50_000_000


def mmap_frees_wanted(n_params: int) -> bool:
    """CPU training: return large frees to the OS (glibc mmap) for models of 50M parameters or more.
    There freed activations no longer fragment the heap (a 130m step's peak RSS 1.34x -> 0.98x of its
    accounting, bench/bench_memory.py); for small models the per-allocation mmap costs more than it
    saves (the tiny.yaml demo ran 1.6x slower). MAMBA_CPU_MMAP_FREES=1 / 0 forces it on / off."""
    forced = os.environ.get("MAMBA_CPU_MMAP_FREES")
    if forced in ("0", "1"):
        return forced == "1"
    return n_params >= MMAP_FREES_MIN_PARAMS


def train(cfg: TrainConfig, derived: dict):
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.utils import dist

    if derived["device"] == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU math ~100x; flushing is harmless
        configure_cpu_threads()
    from composer.utils import reproducibility

    # One process group for the whole run, made here the way the Trainer would (gloo on CPU, nccl on
    # GPU, cfg.dist_timeout), before the datasets: a StreamingDataset built without one starts and
    # stops its own, so rank 0 opened and closed the rendezvous server once per dataset and ranks
    # hung or died with "Connection reset by peer". The Trainer reuses this group.
    dist.initialize_dist(derived["device"], cfg.dist_timeout)
    # the same seed on every rank before init: FSDP shards must come from identical weights
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg)
    if derived["device"] == "cpu" and mmap_frees_wanted(sum(p.numel() for p in model.parameters())):
        from mamba.composer_model import return_large_frees_to_the_os

        return_large_frees_to_the_os()
    train_dl, evaluator = build_dataloaders(cfg, derived["per_device"])
    autoresume, load_path, load_weights_only = cfg.autoresume, cfg.load_path, cfg.load_weights_only
    resumed_from = None
    if cfg.autoresume and cfg.save_folder and "://" not in cfg.save_folder:
        autoresume = False  # our lookup instead of Composer's (latest_checkpoint's docstring says why)
        resumed_from = latest_checkpoint(cfg)
        if resumed_from:
            load_path, load_weights_only = resumed_from, False
    name_the_cpu_for_composer()
    trainer = Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=train_dl,
        eval_dataloader=evaluator, eval_interval=cfg.eval_interval if evaluator else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        max_duration=cfg.max_duration or f"{cfg.data.n_total_tokens}tok",
        optimizers=build_optimizer(cfg, model), schedulers=build_scheduler(cfg),
        precision=cfg.precision, device=derived["device"],
        device_train_microbatch_size=cfg.data.micro_batch_size,
        # weight microbatches by labelled tokens: the loss is then the token mean of the global
        # batch however it is split across ranks and microbatches
        accumulate_train_batch_on_tokens=True,
        algorithms=[GradientClipping("norm", cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else [],
        loggers=build_loggers(cfg), callbacks=build_callbacks(cfg),
        save_folder=cfg.save_folder, save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite, autoresume=autoresume, load_path=load_path,
        load_weights_only=load_weights_only, progress_bar=cfg.progress_bar,
        # loggers.console is another way to write log_to_console + console_log_interval
        log_to_console=cfg.log_to_console or cfg.loggers.console is not None,
        console_log_interval=(cfg.loggers.console.log_interval if cfg.loggers.console
                              else cfg.console_log_interval),
        seed=cfg.seed, dist_timeout=cfg.dist_timeout,
        parallelism_config={"fsdp": fsdp_settings(cfg)} if cfg.fsdp else None,
    )
    if resumed_from and cfg.save_num_checkpoints_to_keep > 0:
        # appended after Composer's CheckpointSaver, so it runs after each save
        pruner = make_checkpoint_pruner(cfg.save_folder, cfg.save_num_checkpoints_to_keep)
        trainer.state.callbacks.append(pruner)
    trainer.fit()
    weights = full_state_dict(model.model) if (cfg.export_folder or cfg.sample) else None
    if dist.get_global_rank() == 0 and weights is not None:
        finish(cfg, derived, weights)
    dist.barrier()
    return trainer


def finish(cfg: TrainConfig, derived: dict, weights: dict) -> None:
    """Rank 0: export a save_pretrained folder and print a sample."""
    from data.tokenizer import load_tokenizer
    from mamba.model import MambaLMHeadModel

    if cfg.save_folder:
        print(f"checkpoints: {cfg.save_folder} (resume: run the same command again)")
    model = MambaLMHeadModel(cfg.model.mamba_config())
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    model.eval()
    if cfg.export_folder:
        model.save_pretrained(cfg.export_folder)
        print(f"model saved to {cfg.export_folder} (MambaLMHeadModel.from_pretrained)")
    if cfg.sample:
        tok = load_tokenizer(derived["meta"].tokenizer, derived["meta"].eos_token_id)
        text = sample_text(model, tok, cfg.sample, derived["meta"].eos_token_id)
        print(f"sample: {cfg.sample.prompt}{text!r}")


def sample_stops(sample: SampleSection) -> list[str]:
    """sample.stop, or else a newline for a prompt ending like data.prepare's qa template: a
    pretrained model goes on from the answer into the next "Question:" (a fine-tuned one ends
    its answer with EOS, which stops generation anyway)."""
    if sample.stop is not None:
        return [s for s in sample.stop if s]
    from data.prepare import TEMPLATES

    answer = TEMPLATES["qa"].split("{input}")[1].rstrip(" ")  # "\nAnswer:"
    return ["\n"] if sample.prompt.rstrip(" ").endswith(answer) else []


@torch.inference_mode()
def sample_text(model, tok, sample: SampleSection, eos_token_id: int | None) -> str:
    """The model's continuation of sample.prompt, ended at EOS or the first stop string."""
    from mamba.generate import cut_at_stop

    prompt = torch.tensor([tok.encode(sample.prompt)], dtype=torch.long)
    out = model.generate(prompt, sample.max_new_tokens, temperature=sample.temperature,
                         eos_token_id=eos_token_id)
    row = out[0, prompt.shape[1]:].tolist()
    if eos_token_id is not None and eos_token_id in row:
        row = row[:row.index(eos_token_id)]
    return cut_at_stop(tok.decode(row), sample_stops(sample))


def available_cpus() -> int:
    """CPUs this process may use: its affinity (taskset, cpusets, Slurm), capped by a cgroup v2
    CPU quota (a container's --cpus); os.cpu_count() counts the whole machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def configure_cpu_threads() -> int:
    """Torch's intra-op threads for a CPU run: OMP_NUM_THREADS when the user set it, else the
    available CPUs shared among the ranks on this node."""
    if "OMP_NUM_THREADS" not in os.environ:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cpus() // ranks_here))
    return torch.get_num_threads()


def per_rank_triton_cache() -> None:
    """slurm.sh sets TRITON_CACHE_ROOT; ranks must not share one Triton cache directory."""
    root = os.environ.get("TRITON_CACHE_ROOT")
    if root and "TRITON_CACHE_DIR" not in os.environ:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(root, f"rank{os.environ.get('LOCAL_RANK', '0')}")


def name_the_cpu_for_composer() -> None:
    """Composer's Trainer names the CPU model in its environment report through py-cpuinfo, which
    answers by starting a new Python process (~1.5 s of CPU in every rank at start-up). On Linux,
    /proc/cpuinfo names it at once: Composer's cached query (collect_env.get_cpu_model) is answered
    from there. Elsewhere, or without a "model name" line, Composer asks py-cpuinfo as before."""
    try:
        with open("/proc/cpuinfo") as f:
            brand = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return
    if not brand:
        return
    import cpuinfo
    from composer.utils import collect_env

    ask = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": brand}
    try:
        collect_env.get_cpu_model()  # lru_cache'd: the Trainer's call gets this answer
    finally:
        cpuinfo.get_cpu_info = ask


def hide_torch_xla_from_composer() -> None:
    """Composer imports torch_xla whenever it is installed (it is, beside neuron/), which doubles
    its import time (~6 s of CPU per process here; bench/bench_startup.py). This recipe trains on
    CPU or CUDA only (device: auto|cpu|gpu; XLA is neuron/'s), so the entrypoint hides torch_xla
    from the process: Composer and the libraries it loads then see it as not installed. A process
    that already imported torch_xla keeps it. Called by the command line entry only: main() called
    in-process (tests, neuron users) leaves the process's imports alone."""
    sys.modules.setdefault("torch_xla", None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    per_rank_triton_cache()
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\nwithout CONFIG.yaml: the embedded default {DEFAULT_CONFIG}")
        return 0
    try:
        cfg, derived = prepare(argv)
        if derived["args"].check:
            print(check_summary(cfg, derived))
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if derived["args"].default and rank0:
        print(f"config: {derived['args'].config} (the embedded default; give CONFIG.yaml to train another)")
    if derived["choose_fsdp2"]:  # before Composer reads it (in Trainer)
        os.environ["FSDP_VERSION"] = "2"
        if rank0:
            print("fsdp on CPU: using Composer's FSDP2 (FSDP_VERSION=2; its default FSDP needs CUDA)")
    try:
        train(cfg, derived)
    except ConfigError as err:  # found while building (e.g. init_from architecture)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    hide_torch_xla_from_composer()
    code = main()
    # The interpreter's last garbage collection at exit walks every object torch, Composer and the
    # libraries made (~1.6 s of CPU per rank here); frozen, they go with the process. atexit handlers
    # (Composer's close, streaming's shared-memory cleanup) still run; only cyclic garbage is not
    # collected.
    import gc

    gc.freeze()
    sys.exit(code)
