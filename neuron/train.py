"""Train MambaLMHeadModel on Trainium with neuronx-distributed (TP, ZeRO-1, bf16).

    python neuron/train.py                                   # the tiny default, one device
    torchrun --nproc_per_node 32 neuron/train.py yamls/pretrain/mamba2-2.7b.yaml --tp 8 \\
        --data /data/shards --dtype bfloat16 --zero1 --max-steps 1000 --checkpoint-every 200
    python neuron/train.py --help                            # every flag

The model, data and optimizer settings come from the recipe's YAML (the same `model:` section,
the same data.prepare shards); flags override. Never imports Composer. A mistake in flags or
config exits 2 with one line, before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python neuron/train.py, torchrun neuron/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# torch-xla imports torch._inductor, which (with triton installed) starts a pool of compile-worker
# processes in every rank at import; XLA never uses them. Before torch is imported; a user's
# TORCH_WARM_POOL=1 wins.
os.environ.setdefault("TORCH_WARM_POOL", "0")


from mamba.strict import ConfigError  # noqa: E402
from neuron.config import DEFAULT_CONFIG, NKI_CHUNK, Settings, check_resume, parse_settings  # noqa: E402

PEAK_FLOPS = {"bfloat16": 95e12, "float32": 23.75e12}  # per NeuronCore-v2 (trn1: 190 / 47.5 TFLOPS per chip)


def check_data(s: Settings) -> None:
    from data.dataset import load_shard_meta
    from data.errors import DataError

    split = os.path.join(s.data, s.train_split)
    default = Path(s.config_path).resolve() == DEFAULT_CONFIG and s.data == "runs/data/tiny"
    if default and not s.remote and not os.path.isdir(split):
        _prepare_tiny(s)
    try:
        meta = load_shard_meta(split, os.path.join(s.remote, s.train_split) if s.remote else None)
    except DataError as err:
        raise ConfigError(f"--data {s.data}: {err}") from None
    if meta.seq_len != s.seq_len:
        raise ConfigError(f"data.seq_len={s.seq_len} but the shards in {s.data} hold rows of {meta.seq_len}")
    if meta.vocab_size > s.model.vocab_size:
        raise ConfigError(f"the shards' tokenizer has {meta.vocab_size} tokens but model.vocab_size="
                          f"{s.model.vocab_size}")


def _prepare_tiny(s: Settings) -> None:
    """The no-argument default prepares the bundled corpus once, as `make demo` does."""
    from data import TINY_CORPUS
    from data.prepare import prepare

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"preparing the bundled corpus into {s.data} (once)", flush=True)
        prepare([str(TINY_CORPUS)], s.data, s.seq_len, progress=False)


def peak_flops(s: Settings) -> float | None:
    from neuron.runtime import NEURON, mode

    if os.environ.get("NEURON_PEAK_TFLOPS"):
        return float(os.environ["NEURON_PEAK_TFLOPS"]) * 1e12
    return PEAK_FLOPS[s.dtype] if mode() == NEURON else None


class Batches:
    """Endless microbatches from the data loader; counts samples for resumption."""

    def __init__(self, loader, samples_per_batch: int):
        self.loader, self.per_batch = loader, samples_per_batch
        self.samples_in_epoch = 0
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:  # a new epoch
            self.samples_in_epoch = 0
            self._it = iter(self.loader)
            batch = next(self._it)
        self.samples_in_epoch += self.per_batch
        return batch

    def state(self) -> dict:
        return self.loader.dataset.state_dict(self.samples_in_epoch, True)

    def restore(self, state: dict) -> None:
        self.loader.dataset.load_state_dict(state)
        self.samples_in_epoch = int(state["sample_in_epoch"])


def log_file(s: Settings) -> str:
    """Where neuronx-distributed's log lines and warnings go (one file per rank)."""
    return os.path.join(s.checkpoint_dir, "logs", f"neuron-rank{os.environ.get('RANK', '0')}.log")


def run(s: Settings) -> dict:
    from data.dataset import build_dataloader
    from mamba.model.flops import training_flops
    from neuron import checkpoint
    from neuron.runtime import NEURON, init_distributed, log_to_file, mode, use_compile_cache
    from neuron.trainer import build_model, build_optimizer, lr_at, step_loss, train_step

    log_to_file(log_file(s))
    if s.compile_cache:
        use_compile_cache(s.compile_cache)
    world = init_distributed(s.tp, s.dist_timeout)
    main = world.rank == 0
    if main and s.unused_keys:
        print(f"note: not used by neuron/train.py (Composer-launcher settings): {', '.join(s.unused_keys)}",
              flush=True)
    model = build_model(s, world)
    optimizer = build_optimizer(model, s, world)
    loader = build_dataloader(s.data, s.remote, split=s.train_split, batch_size=s.micro_batch,
                              shuffle=s.shuffle, seed=s.data_seed, num_workers=s.num_workers,
                              prefetch_factor=s.prefetch_factor, num_canonical_nodes=s.num_canonical_nodes,
                              replication=s.tp if s.tp > 1 else None)
    batches = Batches(loader, s.micro_batch * world.dp)
    step = 0
    if s.resume_tag:
        tag = s.resume_tag
        content = checkpoint.load(s.checkpoint_dir, tag, model, optimizer)
        step = int(content["step"])
        batches.restore(content["data"])
        if main:
            print(f"resumed from {os.path.join(s.checkpoint_dir, tag)} at step {step}", flush=True)
    rows = s.micro_batch * s.grad_accum * world.dp
    flops = training_flops(s.model, rows, s.seq_len, NKI_CHUNK if mode() == NEURON else None)
    peak = peak_flops(s)
    if main:
        print(f"neuron/train.py: {world.mode}, world {world.world_size} (tp {s.tp} x dp {world.dp}), "
              f"{rows} rows x {s.seq_len} tokens per step, {s.max_steps} steps, {s.dtype}"
              f"{', zero1' if s.zero1 else ''}; NxD's log: {log_file(s)}", flush=True)
    last = {}
    window_start, window_steps = time.perf_counter(), 0
    while step < s.max_steps:
        microbatches = [batches.next() for _ in range(s.grad_accum)]
        loss = train_step(model, optimizer, microbatches, step, s, world)
        step += 1
        window_steps += 1
        if step % s.log_every == 0 or step == s.max_steps:
            loss_value = step_loss(loss, world)  # syncs the device: only at log steps
            elapsed = time.perf_counter() - window_start
            seconds = elapsed / window_steps
            last = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, s),
                    "tokens_per_s": rows * s.seq_len / seconds, "step_s": seconds,
                    "mfu": None if peak is None else flops / seconds / (peak * world.world_size)}
            if main:
                mfu = "" if last["mfu"] is None else f"  mfu {100 * last['mfu']:.1f}%"
                print(f"step {step}/{s.max_steps}  loss {loss_value:.4f}  lr {last['lr']:.3g}  "
                      f"tokens/s {last['tokens_per_s']:.0f}{mfu}", flush=True)
                if s.metrics_file:
                    with open(s.metrics_file, "a") as f:
                        f.write(json.dumps(last) + "\n")
            window_start, window_steps = time.perf_counter(), 0
        if s.checkpoint_dir and (step % s.checkpoint_every == 0 or step == s.max_steps):
            content = {"step": step, "data": batches.state(), "model_config": s.model.to_dict(), "tp": s.tp,
                       "zero1": s.zero1}
            where = checkpoint.save(s.checkpoint_dir, step, model, optimizer, content, s.keep_last)
            log_to_file(log_file(s))  # loggers NxD's checkpoint code made on first use
            if main:
                print(f"checkpoint {where}", flush=True)
            window_start = time.perf_counter()
    return last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from data.errors import DataError
    from mamba.model.tp_plan import check_tp
    from neuron.runtime import exit_with_parent, missing_packages

    exit_with_parent()
    try:  # everything a user's flags or config can get wrong, before anything runs
        world_size = os.environ.get("WORLD_SIZE")
        s = parse_settings(argv, int(world_size) if world_size else None)
        check_tp(s.model, s.tp)
        s.resume_tag = check_resume(s)
        check_data(s)
        missing = missing_packages()
        if missing:
            raise ConfigError(f"neuron/train.py needs {' and '.join(missing)}: on trn1 use the Neuron SDK "
                              f"venv; for CPU runs: pip install -r neuron/requirements-cpu-test.txt")
    except (ConfigError, DataError, ValueError) as err:  # ValueError: the model's and the TP plan's rules
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        run(s)
    except ConfigError as err:  # found only once running (e.g. --resume with nothing to resume)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # as in mamba/train.py: no last garbage collection over torch-xla's and NxD's objects at exit
    # (~1.5 s of CPU per rank); atexit handlers still run
    import gc

    gc.freeze()
    sys.exit(code)
