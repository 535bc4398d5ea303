"""Launching neuron/train.py: --resume refuses a checkpoint of another --tp / model / ZeRO-1 setting
(and an empty folder) in one line before building anything; killing the torchrun launcher with
SIGKILL takes its workers with it; NxD's log lines go to a file, not the console."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "neuron" / "train.py")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    for key in ("PJRT_DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def _tiny_model_config(**changes) -> dict:
    from mamba.train_config import load_yaml, parse_config
    from neuron.config import DEFAULT_CONFIG

    config = parse_config(load_yaml(str(DEFAULT_CONFIG))).model.mamba_config().to_dict()
    return {**config, **changes}


def _fake_checkpoint(folder: Path, **content) -> None:
    """What check_resume reads of a checkpoint: a completed step_N and its user_content.pt."""
    tag = folder / "step_4"
    tag.mkdir(parents=True)
    torch.save({"step": 4, "data": {}, "model_config": _tiny_model_config(), "tp": 1, "zero1": False,
                **content}, tag / "user_content.pt")
    (tag / "done").touch()


@pytest.mark.parametrize("content, argv, message", [
    ({"tp": 2}, [], "was trained with --tp 2, this run has --tp 1; resume with --tp 2"),
    ({"model_config": _tiny_model_config(d_intermediate=512)}, [],
     "holds another model (d_intermediate: 512 there, 256 here); resume with its model: section"),
    ({"zero1": True}, [], "was trained with --zero1"),
    ({}, ["model.n_layer=4", "model.layer_pattern=MM*M"], "holds another model (n_layer: 5 there, 4 here"),
])
def test_resume_from_another_setup_exits_2_before_anything(content, argv, message, tmp_path, monkeypatch,
                                                          capsys):
    from neuron.train import main

    _fake_checkpoint(tmp_path / "ck", **content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--resume", "--checkpoint-dir", "ck", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: ") and "\n" not in err and message in err, err
    assert "python -m mamba.convert --from neuron" in err  # the way to start again from its weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing prepared, nothing written


def test_resume_from_an_empty_folder_fails_before_building_the_model(tmp_path):
    (tmp_path / "ck").mkdir()
    proc = subprocess.run([sys.executable, TRAIN, "--resume", "--checkpoint-dir", "ck"], cwd=tmp_path,
                          env=_env(NXD_CPU_MODE="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout == ""  # no NxD start-up, no model, no data preparation
    assert proc.stderr.strip() == "error: --resume: no completed checkpoint (step_N with a done file) in ck"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and not any((tmp_path / "ck").iterdir())


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(300)
def test_workers_end_with_a_killed_launcher_and_nxd_logs_to_a_file(tmp_path):
    """torchrun (1 gloo rank): once it trains, kill -9 the launcher; the worker is gone within seconds.
    The console shows the trainer's lines only; NxD's INFO lines are in the log file."""
    import psutil

    from data import TINY_CORPUS
    from data.prepare import prepare
    from neuron.runtime import missing_packages

    if missing_packages():
        pytest.skip("needs torch-xla and neuronx-distributed: "
                    "pip install -r neuron/requirements-cpu-test.txt")
    prepare([str(TINY_CORPUS)], str(tmp_path / "data"), 256, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), TRAIN, "--data", str(tmp_path / "data"), "--max-steps", "100000",
           "--micro-batch", "1", "--grad-accum", "1", "--log-every", "1", "--checkpoint-dir", "ck",
           "--metrics-file", "m.jsonl"]
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=_env(NXD_CPU_MODE="1"), stdout=out, stderr=err)
    workers, helpers = [], []
    try:
        deadline = time.monotonic() + 240
        while not ((tmp_path / "m.jsonl").exists() and (tmp_path / "m.jsonl").read_text().count("\n") >= 2):
            assert launcher.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.5)
        workers = psutil.Process(launcher.pid).children()  # the ranks (their own helpers watch them)
        helpers = [c for w in workers for c in w.children(recursive=True)]
        assert workers
        # what the run printed (after the kill, the dead worker's multiprocessing resource tracker may
        # warn that it cleans up leaked shared memory: that is the kill, not the run's logging)
        out.flush()
        err.flush()
        console = (tmp_path / "out.txt").read_text() + (tmp_path / "err.txt").read_text()
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(_gone(w.pid) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [w.pid for w in workers if not _gone(w.pid)]
        assert alive == [], f"workers {alive} outlived their launcher"
    finally:
        for w in workers + helpers:
            if not _gone(w.pid):
                w.kill()
        if launcher.poll() is None:
            launcher.kill()
        out.close()
        err.close()
    assert "neuron/train.py: cpu, world 1" in console and "step 2/100000" in console
    assert "neuronx_distributed" not in console and "Warning" not in console, console
    log = (tmp_path / "ck" / "logs" / "neuron-rank0.log").read_text()
    assert "initializing tensor model parallel with size 1" in log
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["step"] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
