"""Every key of the recipe's YAML (mamba.train_config.TrainConfig), and what neuron/train.py does with it.

Each key is in exactly one table (a section name covers the keys below it; the longest entry wins):
  HONOURED  — neuron/train.py uses it (flags override; neuron/config.py reads it);
  REFUSED   — it would change what is trained and neuron/train.py cannot do it: set to anything
              but its default, the run stops with one line naming the key;
  NOT_USED  — settings of the Composer launcher (evaluation, loggers, FSDP, ...) that have no
              meaning here: a YAML that sets them is accepted, and the first line of the run names them.
tests/test_neuron_yaml_keys.py walks TrainConfig, so a new key must be placed in one of them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from mamba.strict import ConfigError
from mamba.train_config import TrainConfig

HONOURED = {
    "variables": "interpolated into the YAML",
    "run_name": "default --checkpoint-dir runs/RUN_NAME/neuron-checkpoints",
    "seed": "model init; data order unless data.shuffle_seed",
    "model": "the model (every MambaConfig field)",
    "model.init_from": "default --init-from",
    "model.activation_checkpointing": "recompute each block in backward",
    "data.local": "default --data",
    "data.remote": "streamed from there",
    "data.train_split": "the split trained on",
    "data.seq_len": "checked against the shards",
    "data.global_batch_size": "gradient accumulation (unless --grad-accum)",
    "data.micro_batch_size": "default --micro-batch",
    "data.shuffle": "shuffle the training samples",
    "data.shuffle_seed": "the shuffle's seed",
    "data.num_canonical_nodes": "streaming's canonical nodes (the sample order)",
    "data.num_workers": "DataLoader workers",
    "data.prefetch_factor": "DataLoader prefetch",
    "data.n_total_tokens": "refused unless --max-steps (the trainer counts steps)",
    "max_duration": "default --max-steps (in ba)",
    "optimizer": "AdamW (name adamw) or Composer's DecoupledAdamW (name decoupled_adamw)",
    "scheduler": "warmup, then cosine / linear / constant, as Composer's *WithWarmupScheduler",
    "precision": "default --dtype: fp32 -> float32, amp_bf16 -> bfloat16 (amp_fp16 refused)",
    "grad_clip_norm": "default --grad-clip",
    "save_interval": "default --checkpoint-every (in ba)",
    "save_num_checkpoints_to_keep": "default --keep-last",
    "console_log_interval": "default --log-every (in ba)",
    "dist_timeout": "the process group's timeout",
}

REFUSED = {
    "load_path": "a Composer checkpoint: convert it (python -m mamba.convert --from composer SRC --config "
                 "YAML --to native DIR) and give --init-from DIR",
    "load_weights_only": "belongs to load_path: use --init-from DIR",
}

NOT_USED = {
    "model.fsdp_layer_wrap": "FSDP",
    "fsdp": "neuron/ shards with --tp and --zero1",
    "device": "the device comes from the environment (Neuron SDK, PJRT_DEVICE, NXD_CPU_MODE)",
    "data.eval_split": "no evaluation",
    "data.eval_batch_size": "no evaluation",
    "eval_interval": "no evaluation",
    "eval_subset_num_batches": "no evaluation",
    "save_folder": "checkpoints go to --checkpoint-dir",
    "save_overwrite": "checkpoints go to --checkpoint-dir",
    "autoresume": "use --resume",
    "export_folder": "convert a checkpoint: python -m mamba.convert --from neuron",
    "loggers": "--metrics-file",
    "callbacks": "Composer callbacks",
    "progress_bar": "log lines every --log-every steps",
    "log_to_console": "log lines every --log-every steps",
    "sample": "no sampling at the end",
}


def _dataclass_of(tp: Any) -> type | None:
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every key of the YAML schema, dotted (a section of sections is walked; a field-less one is a key)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        sub = _dataclass_of(hints[f.name])
        if sub is not None and dataclasses.fields(sub):
            keys.extend(config_keys(sub, path + "."))
        else:
            keys.append(path)
    return keys


def table_of(key: str) -> tuple[str, str] | None:
    """(table name, entry) of the longest entry covering `key`, or None."""
    best = None
    for name, table in (("HONOURED", HONOURED), ("REFUSED", REFUSED), ("NOT_USED", NOT_USED)):
        for entry in table:
            if (key == entry or key.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (name, entry)
    return best


def _set_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in values.items():
        path = prefix + str(k)
        keys.append(path)
        if isinstance(v, dict) and path not in ("variables", "model.ssm_cfg", "model.attn_cfg"):
            keys.extend(_set_keys(v, path + "."))
    return keys


def check_keys(values: dict, cfg: TrainConfig) -> list[str]:
    """Refuse a REFUSED key set to anything but its default (ConfigError); returns the NOT_USED
    entries the YAML sets, for the run's first line."""
    defaults = TrainConfig(model=cfg.model, data=cfg.data)
    for key in REFUSED:
        if getattr(cfg, key) != getattr(defaults, key):
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: neuron/train.py does not take it; "
                              f"{REFUSED[key]}")
    unused = []
    for key in _set_keys(values):
        where = table_of(key)
        if where and where[0] == "NOT_USED" and where[1] not in unused:
            unused.append(where[1])
    return unused
