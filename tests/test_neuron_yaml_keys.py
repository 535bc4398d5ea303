"""neuron/train.py never ignores a key of the recipe's YAML: each is honoured, refused (one line,
exit 2) or named on the run's first line as a Composer-launcher setting (neuron/yaml_keys.py).
The honoured ones do what Composer does with them: scheduler.name against Composer's own
schedulers, optimizer.name decoupled_adamw against Composer's DecoupledAdamW."""

import dataclasses

import pytest
import torch

from neuron.yaml_keys import HONOURED, NOT_USED, REFUSED, config_keys, table_of


def test_every_yaml_key_is_honoured_refused_or_named():
    keys = config_keys()
    assert {"scheduler.name", "optimizer.name", "data.shuffle_seed", "data.num_canonical_nodes",
            "data.train_split", "precision", "loggers.console.log_interval",
            "callbacks.lr_monitor"} <= set(keys)
    unplaced = [k for k in keys if table_of(k) is None]
    assert unplaced == [], f"place these TrainConfig keys in neuron/yaml_keys.py: {unplaced}"
    entries = [*HONOURED, *REFUSED, *NOT_USED]
    assert len(entries) == len(set(entries)), "a key in two tables"
    stale = [e for e in entries if not any(k == e or k.startswith(e + ".") for k in keys)]
    assert stale == [], f"entries naming no TrainConfig key: {stale}"
    for key in ("scheduler.name", "optimizer.name", "data.shuffle_seed", "data.num_canonical_nodes",
                "data.train_split", "precision"):
        assert table_of(key)[0] == "HONOURED", key


def _settings(*argv):
    from neuron.config import parse_settings

    return parse_settings(list(argv))


def test_data_keys_reach_the_settings():
    s = _settings("data.shuffle_seed=99", "data.num_canonical_nodes=4", "data.train_split=other",
                  "data.num_workers=2", "data.prefetch_factor=3")
    assert (s.data_seed, s.num_canonical_nodes, s.train_split, s.num_workers, s.prefetch_factor) == \
        (99, 4, "other", 2, 3)
    assert _settings("seed=5").data_seed == 5  # no shuffle_seed: the run's seed, as the recipe
    assert _settings("console_log_interval=7ba").log_every == 7


def test_precision_sets_the_dtype():
    assert _settings().dtype == "float32"
    assert _settings("precision=amp_bf16", "--zero1").dtype == "bfloat16"
    assert _settings("precision=amp_bf16", "--dtype", "float32").dtype == "float32"  # the flag wins


@pytest.mark.parametrize("argv, message", [
    (["load_path=/somewhere/ep0.pt"], "load_path='/somewhere/ep0.pt': neuron/train.py does not take it"),
    (["load_weights_only=true"], "load_weights_only=True: neuron/train.py does not take it"),
    (["precision=amp_fp16"], "precision=amp_fp16: neuron/train.py trains in float32 or bfloat16"),
    (["precision=amp_bf16"], "precision=amp_bf16 (bfloat16) needs --zero1"),
    (["data.train_split=nosuch"], "nosuch"),
])
def test_refused_keys_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from data import TINY_CORPUS
    from data.prepare import prepare
    from neuron.train import main

    prepare([str(TINY_CORPUS)], str(tmp_path / "data"), 256, progress=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--data", str(tmp_path / "data"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "runs").exists()


def test_launcher_keys_are_named():
    assert _settings().unused_keys == ["data.eval_batch_size", "eval_interval", "eval_subset_num_batches",
                                       "save_folder", "autoresume", "export_folder", "progress_bar",
                                       "log_to_console", "callbacks", "loggers", "sample"]  # yamls/tiny.yaml


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_is_composers(name):
    """lr_at(step) = lr x Composer's *WithWarmupScheduler at batch `step` (what the recipe trains with)."""
    from types import SimpleNamespace

    from composer.core import Time, Timestamp
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    from neuron.trainer import lr_at

    s = _settings(f"scheduler.name={name}", "scheduler.warmup=3ba", "scheduler.alpha_f=0.2",
                  "--max-steps", "10")
    assert (s.scheduler, s.warmup_steps, s.min_lr_ratio) == (name, 3, 0.2)
    composer = {"cosine": CosineAnnealingWithWarmupScheduler(t_warmup="3ba", alpha_f=0.2),
                "linear": LinearWithWarmupScheduler(t_warmup="3ba", alpha_f=0.2),
                "constant": ConstantWithWarmupScheduler(t_warmup="3ba")}[name]
    for step in range(10):
        state = SimpleNamespace(max_duration=Time.from_timestring("10ba"), timestamp=Timestamp(batch=step))
        assert lr_at(step, s) == pytest.approx(s.lr * composer(state), rel=1e-12, abs=1e-15), step


def test_decoupled_adamw_is_composers():
    from composer.optim import DecoupledAdamW

    from mamba.model import MambaConfig, MambaLMHeadModel
    from neuron.trainer import build_optimizer, lr_at, param_groups

    s = dataclasses.replace(_settings("optimizer.name=decoupled_adamw", "optimizer.weight_decay=0.01",
                                      "--max-steps", "4", "--warmup-steps", "1"),
                            model=MambaConfig(vocab_size=32, d_model=32, n_layer=1,
                                              ssm_cfg={"d_state": 16, "headdim": 16}))
    assert s.optimizer == "decoupled_adamw"
    torch.manual_seed(0)
    ours = MambaLMHeadModel(s.model)
    theirs = MambaLMHeadModel(s.model)
    theirs.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, s, world=None)
    ref = DecoupledAdamW(param_groups(theirs, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"] = lr_at(step, s)
        for (_, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    pairs = zip(ours.parameters(), theirs.parameters(), strict=True)
    diff = max((a - b).abs().max().item() for a, b in pairs)
    assert diff < 1e-6, diff
