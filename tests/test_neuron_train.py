"""neuron/train.py on torch-xla's CPU device (PJRT_DEVICE=CPU, world size 1): the tiny default
trains and its loss falls; NxD checkpoints keep the last K; --resume from a checkpoint ends
bit-identical to the uninterrupted run; NeuronZero1Optimizer steps equal plain AdamW steps;
every bad flag exits 2 with one line.

Also a worker: `python tests/test_neuron_train.py zero1 OUT` (run in a fresh process).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

TRAIN = str(ROOT / "neuron" / "train.py")


def _env(pjrt_device: str | None = "CPU"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("NXD_CPU_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PJRT_DEVICE"):
        env.pop(key, None)
    if pjrt_device:
        env["PJRT_DEVICE"] = pjrt_device
    return env


def _needs_nxd():
    from neuron.runtime import missing_packages

    missing = missing_packages()
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: pip install -r neuron/requirements-cpu-test.txt")


def zero1_worker(out: str) -> None:
    """Two steps of NeuronZero1Optimizer and of torch AdamW from the same weights and batches."""
    import dataclasses

    from mamba.model import MambaConfig
    from neuron.config import parse_settings
    from neuron.parallel import full_state_dict
    from neuron.runtime import init_distributed
    from neuron.trainer import build_model, build_optimizer, train_step

    world = init_distributed(1)
    assert world.world_size == 1 and world.mode == "xla_cpu"
    config = MambaConfig(vocab_size=64, d_model=32, n_layer=2, layer_pattern="M*", pad_vocab_size_multiple=8,
                         ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 32},
                         attn_cfg={"num_heads": 2})
    base = dataclasses.replace(parse_settings(["--lr", "0.01", "--warmup-steps", "2", "--max-steps", "2"]),
                               model=config, eps=1e-3)
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(2):
        labels = torch.randint(0, 64, (2, 64), generator=g)
        labels[torch.rand(2, 64, generator=g) < 0.2] = -100
        steps.append([{"input_ids": torch.randint(0, 64, (2, 64), generator=g), "labels": labels,
                       "seq_idx": torch.zeros(2, 64, dtype=torch.int32)}])
    finals = {}
    for name, zero1 in (("adamw", False), ("zero1", True)):
        s = dataclasses.replace(base, zero1=zero1)
        model = build_model(s, world)
        opt = build_optimizer(model, s, world)
        assert type(opt).__name__ == ("NeuronZero1Optimizer" if zero1 else "AdamW")
        for step, mbs in enumerate(steps):
            train_step(model, opt, mbs, step, s, world)
        finals[name] = full_state_dict(model, 1)
    torch.manual_seed(base.seed)
    initial = build_model(base, world)
    start = full_state_dict(initial, 1)
    diff = max((finals["zero1"][k] - v).abs().max().item() for k, v in finals["adamw"].items())
    moved = max((finals["adamw"][k] - v).abs().max().item() for k, v in start.items())
    Path(out).write_text(json.dumps({"diff": diff, "moved": moved}))


if __name__ == "__main__":
    if sys.argv[1] == "zero1":
        zero1_worker(sys.argv[2])
    sys.exit(0)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(400)
def test_tiny_default_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    """`python neuron/train.py` in a fresh folder: prepares the bundled corpus, trains the tiny hybrid
    (no PJRT_DEVICE: without the Neuron SDK it picks torch-xla's CPU device itself)."""
    _needs_nxd()
    from neuron.checkpoint import read_neuron_checkpoint

    cache = tmp_path / "xla-cache"  # compiled by the first run, reused by the resumed one
    common = ["--max-steps", "4", "--micro-batch", "2", "--grad-accum", "2", "--log-every", "1",
              "--checkpoint-every", "1", "--zero1", "--compile-cache", str(cache)]
    run_a = tmp_path / "a"
    run_a.mkdir()
    proc = subprocess.run([sys.executable, TRAIN, *common, "--metrics-file", "m.jsonl"], cwd=run_a,
                          env=_env(pjrt_device=None), capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "xla_cpu, world 1 (tp 1 x dp 1)" in proc.stdout
    # the YAML's Composer-launcher keys are named; NxD's INFO lines and warnings are in a log file
    assert "note: not used by neuron/train.py (Composer-launcher settings): " in proc.stdout
    console = proc.stdout + proc.stderr
    assert "neuronx_distributed" not in console and "Warning" not in console, console
    nxd_log = run_a / "runs" / "tiny" / "neuron-checkpoints" / "logs" / "neuron-rank0.log"
    assert "initializing tensor model parallel with size 1" in nxd_log.read_text()
    losses = [m["loss"] for m in _metrics(run_a / "m.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    ckpts = run_a / "runs" / "tiny" / "neuron-checkpoints"
    # keep-last 2 (yamls/tiny.yaml's save_num_checkpoints_to_keep) of step_1 .. step_4
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_3", "step_4"]

    assert any(cache.iterdir()), "nothing in the compile cache"

    # The state on disk of a run killed after its step-3 checkpoint; --resume finishes it.
    run_b = tmp_path / "b"
    shutil.copytree(run_a / "runs", run_b / "runs")
    shutil.rmtree(run_b / "runs" / "tiny" / "neuron-checkpoints" / "step_4")
    proc = subprocess.run([sys.executable, TRAIN, *common, "--resume", "--metrics-file", "m.jsonl"],
                          cwd=run_b, env=dict(_env(), PT_XLA_DEBUG_LEVEL="1"),  # torch-xla: why each compile
                          capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "at step 3" in proc.stdout
    resumed = _metrics(run_b / "m.jsonl")
    assert [m["step"] for m in resumed] == [4]
    assert [m["loss"] for m in resumed] == losses[3:]  # same data in the same order, same weights
    # the resumed run compiled only what loading a checkpoint runs; its steps came from the cache
    compiles = proc.stderr.split("Compilation Cause")[1:]
    assert compiles and all("load_checkpoint (" in c.split("Post Compilation")[0] for c in compiles), \
        proc.stderr[-4000:]
    assert "train_step (" not in proc.stderr, proc.stderr[-4000:]
    config_a, final_a = read_neuron_checkpoint(ckpts)
    _, final_b = read_neuron_checkpoint(run_b / "runs" / "tiny" / "neuron-checkpoints" / "step_4")
    assert config_a.layer_pattern == "MM*M-"
    for key, value in final_a.items():
        assert torch.equal(value, final_b[key]), key
    # `python -m mamba.convert --from neuron CKPT --to native DST` gives the same weights
    from mamba.convert import main as convert_main
    from mamba.model import MambaLMHeadModel

    assert convert_main(["--from", "neuron", str(ckpts), "--to", "native", str(tmp_path / "native")]) == 0
    converted = MambaLMHeadModel.from_pretrained(tmp_path / "native").state_dict()
    for key, value in final_a.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.timeout(300)
def test_zero1_steps_equal_adamw_steps(tmp_path):
    _needs_nxd()
    out = tmp_path / "zero1.json"
    proc = subprocess.run([sys.executable, __file__, "zero1", str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["moved"] > 1e-3 and r["diff"] < 1e-5, r


@pytest.mark.parametrize("argv, message", [
    (["--tpp", "2"], "unrecognized arguments: --tpp"),
    (["--tp", "0"], "--tp 0: must be > 0"),
    (["--tp", "two"], "invalid int value"),
    (["--dtype", "float16"], "--dtype float16: must be one of float32, bfloat16"),
    (["--dtype", "bfloat16"], "--dtype bfloat16 needs --zero1"),
    (["--sequence-parallel"], "--sequence-parallel is not supported"),
    (["data.seq_len=200"], "data.seq_len=200: must be a multiple of 128"),
    (["model.d_modle=64"], "did you mean config.model.d_model"),
    (["--tp", "2"], "--tp 2 needs 2 processes (or a multiple): launch with torchrun --nproc_per_node 2"),
    (["--max-steps", "-3"], "--max-steps -3: must be > 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0: must be between 0 and 1"),
    (["--data", "/nonexistent/shards"], "--data /nonexistent/shards"),
    (["--init-from", "/nonexistent/model"], "no config.json there"),
    (["/nonexistent.yaml"], "config file '/nonexistent.yaml' not found"),
    (["--compile-cache", __file__], "not a folder; give a folder (made if missing)"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from neuron.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_compile_cache_and_neuron_cc_flags_naming_two_folders_is_refused(capsys, tmp_path, monkeypatch):
    from neuron.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEURON_CC_FLAGS", "--model-type transformer --cache_dir=/fsx/cache")
    assert main(["--compile-cache", "here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--compile-cache here but NEURON_CC_FLAGS has --cache_dir=/fsx/cache: give one of them" in err, err
    assert list(tmp_path.iterdir()) == []


def test_compile_cache_on_neuron_goes_to_neuron_cc_flags(monkeypatch, tmp_path):
    from neuron import runtime

    monkeypatch.setenv("PJRT_DEVICE", "NEURON")  # what the Neuron SDK's venv sets
    monkeypatch.delenv("NXD_CPU_MODE", raising=False)
    assert runtime.mode() == runtime.NEURON
    monkeypatch.setenv("NEURON_CC_FLAGS", "--model-type transformer")
    runtime.use_compile_cache(str(tmp_path / "cc"))
    assert os.environ["NEURON_CC_FLAGS"] == f"--model-type transformer --cache_dir={tmp_path / 'cc'}"
    assert (tmp_path / "cc").is_dir()


def test_tp_the_model_cannot_take_is_refused(capsys, tmp_path, monkeypatch):
    from neuron.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--tp", "2", "--grad-accum", "1", "model.attn_cfg={num_heads: 4, num_heads_kv: 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_heads_kv=1 not divisible by tp=2" in err and "\n" not in err, err


def test_reading_a_folder_that_is_no_neuron_checkpoint_is_one_clear_error(tmp_path):
    from mamba.interop.tensors import ConvertError
    from neuron.checkpoint import read_neuron

    with pytest.raises(ConvertError, match="not a neuron checkpoint"):
        read_neuron(tmp_path)
    (tmp_path / "step_3" / "model").mkdir(parents=True)
    with pytest.raises(ConvertError, match="no user_content.pt"):
        read_neuron(tmp_path / "step_3")


def test_slurm_script_parses_and_launches_neuron_train():
    script = ROOT / "neuron" / "slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "torchrun" in text and "neuron/train.py" in text and "--nnodes" in text


def _tiny_model(seed: int, **changes):
    from mamba.model import MambaLMHeadModel
    from mamba.train_config import load_yaml, parse_config
    from neuron.config import DEFAULT_CONFIG

    config = parse_config(load_yaml(str(DEFAULT_CONFIG))).model.mamba_config()
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return MambaLMHeadModel(config)


def test_init_from_another_architecture_exits_2(capsys, tmp_path, monkeypatch):
    from neuron.train import main

    _tiny_model(0, d_intermediate=512).save_pretrained(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    assert main(["--init-from", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "different architecture (d_intermediate: 512 there, 256 in the YAML)" in err, err


@pytest.mark.timeout(200)
def test_init_from_a_native_folder_starts_from_its_weights(tmp_path):
    """One gloo process (NXD_CPU_MODE=1): one step at a negligible lr from a saved model."""
    _needs_nxd()
    from data import TINY_CORPUS
    from data.prepare import prepare
    from neuron.checkpoint import read_neuron_checkpoint

    prepare([str(TINY_CORPUS)], str(tmp_path / "data"), 256, progress=False)
    start = _tiny_model(123)
    start.save_pretrained(tmp_path / "start")
    env = dict(_env(pjrt_device=None), NXD_CPU_MODE="1")
    proc = subprocess.run([sys.executable, TRAIN, "--init-from", str(tmp_path / "start"), "--data",
                           str(tmp_path / "data"), "--max-steps", "1", "--lr", "1e-9", "--micro-batch", "1",
                           "--grad-accum", "1", "--checkpoint-every", "1", "--checkpoint-dir", "ck"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _, trained = read_neuron_checkpoint(tmp_path / "ck")
    fresh = _tiny_model(17).state_dict()  # what the run would start from without --init-from
    wanted = start.state_dict()
    assert max((trained[k] - v).abs().max().item() for k, v in wanted.items()) < 1e-6
    assert max((fresh[k] - v).abs().max().item() for k, v in wanted.items()) > 1e-2
