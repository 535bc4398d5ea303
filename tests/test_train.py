"""Real training runs on CPU: the loss falls, ranks agree, and kill -9 + autoresume is exact."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = str(Path(sys.executable).parent / "composer")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare(inputs=[str(ROOT / "data" / "corpus" / "tiny_corpus.jsonl")], output=str(out), seq_len=64,
            val_ratio=0.02, progress=False)
    return out


def write_config(tmp_path, shards, **over):
    cfg = {
        "run_name": "t",
        "seed": 3,
        "model": {"vocab_size": 258, "d_model": 32, "n_layer": 3, "layer_pattern": "Mm*",
                  "ssm_cfg": {"d_state": 8, "headdim": 16, "chunk_size": 16},
                  "attn_cfg": {"num_heads": 2}},
        "data": {"local": str(shards), "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2,
                 "num_canonical_nodes": 1},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"name": "constant", "warmup": "0ba"},
        "max_duration": "6ba",
        "eval_interval": "6ba",
        "eval_subset_num_batches": 2,
        "save_folder": str(tmp_path / "ck"),
        "save_interval": "1000ba",
        "progress_bar": False,
        "callbacks": {"loss_curve": {}},
        "export_folder": str(tmp_path / "model"),
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Rendezvous failures of the multi-rank launches on a busy VM (seen ~1 in 4 full runs), all before
# training starts: a launch that dies with one of these is started once more.
RENDEZVOUS_ERRORS = ("DistNetworkError", "connectFullMesh failed", "failed to recv, got 0 bytes",
                     "Address already in use")


def run(cmd, tmp_path, env=None, check=True):
    # gloo over loopback: the machine's hostname may resolve to an interface ranks cannot reach
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    for attempt in range(2):
        result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=tmp_path,
                                timeout=600)
        output = result.stdout + result.stderr
        if result.returncode == 0 or attempt or not any(e in output for e in RENDEZVOUS_ERRORS):
            break
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def losses(tmp_path):
    return json.loads((tmp_path / "ck" / "loss_curve.json").read_text())["loss"]


def test_training_lowers_the_loss_and_reports_eval_metrics(shards, tmp_path):
    cfg = write_config(tmp_path, shards, max_duration="40ba", eval_interval="40ba",
                       **{"loggers": {"file": {"filename": str(tmp_path / "log.txt")}}})
    run([sys.executable, str(ROOT / "mamba" / "train.py"), str(cfg)], tmp_path)
    curve = losses(tmp_path)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0, curve
    log = (tmp_path / "log.txt").read_text()
    for metric in ("metrics/eval/LanguageCrossEntropy", "metrics/eval/LanguagePerplexity",
                   "metrics/eval/TokenAccuracy"):
        assert metric in log
    assert (tmp_path / "ck" / "loss_curve.png").stat().st_size > 1000
    from mamba.model import MambaLMHeadModel

    model = MambaLMHeadModel.from_pretrained(tmp_path / "model")
    assert model.config.layer_pattern == "Mm*"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(shards, tmp_path, mode):
    one = tmp_path / "one"
    one.mkdir()
    run([COMPOSER, "-n", "1", str(ROOT / "mamba" / "train.py"), str(write_config(one, shards))], one)
    two = tmp_path / "two"
    two.mkdir()
    env = {}
    over = {}
    if mode == "fsdp2":
        env["FSDP_VERSION"] = "2"
        over["fsdp"] = {"sharding_strategy": "FULL_SHARD"}
    run([COMPOSER, "-n", "2", "--master_addr", "127.0.0.1", str(ROOT / "mamba" / "train.py"),
         str(write_config(two, shards, **over))], two, env=env)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-3 * max(a), (a, b)
    from safetensors.torch import load_file

    wa = load_file(str(one / "model" / "model.safetensors"))
    wb = load_file(str(two / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_kill_9_then_autoresume_is_bit_identical(shards, tmp_path):
    from safetensors.torch import load_file

    over = dict(max_duration="10ba", save_interval="2ba", autoresume=True, save_num_checkpoints_to_keep=-1)
    ref = tmp_path / "ref"
    ref.mkdir()
    run([sys.executable, str(ROOT / "mamba" / "train.py"), str(write_config(ref, shards, **over))], ref)

    cut = tmp_path / "cut"
    cut.mkdir()
    cfg = write_config(cut, shards, **over)
    cmd = [sys.executable, str(ROOT / "mamba" / "train.py"), str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=cut, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "ck" / "latest-rank0.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_symlink() and "ba4" in os.readlink(latest):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists()
    run(cmd, cut)  # the same command again: autoresume picks up the latest checkpoint

    wa = load_file(str(ref / "model" / "model.safetensors"))
    wb = load_file(str(cut / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
