"""`python mamba/train.py [CONFIG] [key=value ...] --check`, the embedded default config, and the
original Composer Mamba recipe's documented config spellings (beta1/beta2, fsdp.process_group)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mamba.strict import ConfigError
from mamba.train import DEFAULT_CONFIG, main, parse_args, prepare

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "mamba" / "train.py")
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

# The options the original recipe's README documents for its config.yaml, with its example values
# (model/data/optimizer/fsdp sections; it reads its own data from paths this recipe does not use,
# so the test adds data.local on the command line).
ORIGINAL_RECIPE_CONFIG = """\
model:
  vocab_size: 65024
  d_model: 2688
  n_layer: 28
  fsdp_layer_wrap: true
  activation_checkpointing: true
data:
  global_batch_size: 896
  micro_batch_size: 7
  eval_batch_size: 8
  seq_len: 4096
  num_workers: 2
  prefetch_factor: 2
  n_total_tokens: 400039358022
optimizer:
  lr: 0.00045
  beta1: 0.9
  beta2: 0.95
  weight_decay: 0.1
fsdp:
  sharding_strategy: FULL_SHARD
  process_group: null
  backward_prefetch: BACKWARD_PRE
  activation_checkpointing_reentrant: true
  activation_checkpointing: true
  limit_all_gathers: false
  verbose: true
"""


def prepared(tmp_path_factory, seq_len):
    from data.prepare import prepare as prepare_data

    out = tmp_path_factory.mktemp("data") / f"tiny{seq_len}"
    prepare_data(inputs=[str(ROOT / "data" / "corpus" / "tiny_corpus.jsonl")], output=str(out),
                 seq_len=seq_len, val_ratio=0.05, progress=False)
    return out


@pytest.fixture(scope="module")
def shards256(tmp_path_factory):
    return prepared(tmp_path_factory, 256)  # yamls/tiny.yaml's seq_len


@pytest.fixture(scope="module")
def shards4096(tmp_path_factory):
    return prepared(tmp_path_factory, 4096)  # the original recipe's seq_len


def cli(args, cwd, env=None, python=sys.executable):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([str(python), TRAIN, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=300)


def test_args_check_flag_never_collides_with_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    assert parse_args([str(cfg), "a=1", "--check", "b=2"]) == parse_args(["--check", str(cfg), "a=1", "b=2"])
    args = parse_args([str(cfg), "run_name=--check", "save_folder=x --check"])
    assert not args.check and args.overrides == ["run_name=--check", "save_folder=x --check"]
    args = parse_args(["run_name=x", "--check"])  # no config file: the embedded default
    assert args.default and args.config == str(DEFAULT_CONFIG) and args.overrides == ["run_name=x"]
    assert parse_args([]).default and not parse_args([]).check
    odd = tmp_path / "a=b.yaml"  # an existing file is the config even with '=' in its name
    odd.write_text("{}")
    assert parse_args([str(odd)]).config == str(odd)
    for bad in (["--chek"], [str(cfg), "--lr=1"], [str(cfg), "-c"]):
        with pytest.raises(ConfigError, match=f"unknown option '{bad[-1]}'"):
            parse_args(bad)


def test_check_passes_a_good_config_in_one_line_and_writes_nothing(shards256, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(DEFAULT_CONFIG), f"data.local={shards256}", "--check"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ok: {DEFAULT_CONFIG}: 5 layers MM*M-, d_model 128, ")
    assert "300ba of 16 x 256 tokens" in lines[0] and "device cpu" in lines[0] and err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written (no runs/ folder)


@pytest.mark.parametrize("args,message", [
    (["optimizer.lr=0"], "error: config.optimizer.lr=0.0: must be > 0"),
    (["--check", "scheduler.warmup=301ba"], "error: scheduler.warmup='301ba' is longer than the run (300ba)"),
    (["data.micro_batch_size=0"], "error: config.data.micro_batch_size=0: must be >= 1"),
    (["optimizer.beta1=0.8"], "error: optimizer.betas=[0.9, 0.95] and optimizer.beta1 both set"),
])
def test_check_fails_with_one_line_exit_2(shards256, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([str(DEFAULT_CONFIG), f"data.local={shards256}", *args, "--check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith(message), err


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no .venv")
def test_check_runs_as_venv_python_from_another_folder_with_the_default_config(shards256, tmp_path):
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user types it
    result = subprocess.run([str(VENV_PYTHON), TRAIN, "--check", f"data.local={shards256}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {DEFAULT_CONFIG} (the default config): ")
    assert len(result.stdout.splitlines()) == 1 and "composer" not in result.stderr.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert time.perf_counter() - started < 60  # no launcher, no training


def test_the_original_recipes_documented_config_passes(shards4096, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(ORIGINAL_RECIPE_CONFIG)
    monkeypatch.delenv("FSDP_VERSION", raising=False)  # its fsdp section on CPU: FSDP2 is chosen
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, derived = prepare([str(path), f"data.local={shards4096}", "--check"])
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.lr == 0.00045
    assert cfg.fsdp.process_group is None and cfg.fsdp.backward_prefetch == "BACKWARD_PRE"
    assert cfg.model.d_model == 2688 and cfg.data.n_total_tokens == 400039358022
    assert derived["accum"] == 128  # 896 on one rank in microbatches of 7
    result = cli([str(path), f"data.local={shards4096}", "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "28 layers" in result.stdout and "400039358022tok" in result.stdout


def test_the_original_spellings_mistakes_are_clear(shards4096, tmp_path):
    path = tmp_path / "config.yaml"
    documented = yaml.safe_load(ORIGINAL_RECIPE_CONFIG)
    documented["optimizer"]["beta2"] = 1.0
    path.write_text(yaml.safe_dump(documented))
    with pytest.raises(ConfigError, match=r"^config.optimizer.beta2=1.0: must be >= 0 and < 1$"):
        prepare([str(path), f"data.local={shards4096}"])
    for value in ("node", "local_world", "self"):
        with pytest.raises(ConfigError, match=f"fsdp.process_group='{value}': only null"):
            prepare([str(path), f"data.local={shards4096}", f"fsdp.process_group={value}",
                     "optimizer.beta2=0.95"])


@pytest.mark.timeout(240)
def test_no_config_argument_trains_the_embedded_default_and_names_it(shards256, tmp_path):
    # the default (yamls/tiny.yaml) cut short: two batches, a tiny eval and sample
    over = [f"data.local={shards256}", "max_duration=2ba", "scheduler.warmup=1ba", "eval_interval=2ba",
            "eval_subset_num_batches=1", "sample.max_new_tokens=4", "progress_bar=false",
            "loggers.console.log_interval=1ba"]
    result = cli(over, tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    assert out[0] == f"config: {DEFAULT_CONFIG} (the embedded default; give CONFIG.yaml to train another)"
    assert "sample: Question: What is 7 plus 4?\nAnswer:'" in result.stdout  # the completion's repr
    logged = result.stdout + result.stderr  # loggers.console: Composer's console lines, every batch
    assert "[batch=1/2]" in logged and "[batch=2/2]" in logged, logged[-2000:]
    assert (tmp_path / "runs" / "tiny" / "model" / "config.json").is_file()
