"""The Composer recipe against the bare model's training step, on this CPU.

For tiny.yaml and a mamba2-130m-shaped model: tokens/s and MFU through
`composer -n {1,2} mamba/train.py` (median step time from the loss-curve callback's clock),
and the same model's bare step (forward, masked CE, backward, grad clip, AdamW) measured in
the same run. MFU uses the model FLOPs of mamba/model/flops.py over the measured sgemm peak.

Run: .venv/bin/python bench/bench_recipe.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, matmul_peak_gflops  # noqa: E402

from kernels.ssd import CPU_CHUNK_SIZE  # noqa: E402
from mamba.model import MambaLMHeadModel  # noqa: E402
from mamba.model.flops import training_flops  # noqa: E402
from mamba.train_config import load_yaml, parse_config  # noqa: E402

COMPOSER = str(Path(sys.executable).parent / "composer")


def bare_step_time(cfg, steps: int) -> float:
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg.model.mamba_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    d = cfg.data
    ids = torch.randint(0, 256, (d.micro_batch_size, d.seq_len))
    seq_idx = torch.zeros_like(ids, dtype=torch.int32)
    accum = d.global_batch_size // d.micro_batch_size
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for _ in range(accum):
            logits = model(ids, seq_idx=seq_idx)[..., :cfg.model.vocab_size]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def recipe_step_time(yaml_path: str, overrides: list[str], ranks: int, workdir: Path) -> float:
    save = Path(tempfile.mkdtemp(dir=workdir, prefix=f"ck{ranks}-"))
    cmd = [COMPOSER, "-n", str(ranks), str(ROOT / "mamba" / "train.py"), yaml_path, *overrides,
           f"save_folder={save}", "callbacks.loss_curve.filename=curve.png", "export_folder=null",
           "sample=null", "progress_bar=false", "autoresume=false", "eval_interval=100000ba",
           "data.eval_split=null", "save_interval=100000ba", "loggers.file=null"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    stamps = json.loads((save / "curve.json").read_text())["time"]
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))


def report(name, yaml_path, overrides, steps, peak, workdir):
    cfg = parse_config(load_yaml(yaml_path, overrides))
    d = cfg.data
    tokens = d.global_batch_size * d.seq_len
    flops = training_flops(cfg.model.mamba_config(), d.global_batch_size, d.seq_len,
                           chunk_size=CPU_CHUNK_SIZE)
    # in a child process: its memory is returned before the recipe runs (one 130m-sized
    # training process at a time fits in 24 GB, two do not)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        bare = pool.apply(bare_step_time, (cfg, steps))
    print(f"{name}: global batch {d.global_batch_size} x {d.seq_len} tokens, micro batch "
          f"{d.micro_batch_size}, {flops / 1e9:.1f} GFLOP per step")
    print(f"  bare model step      : {bare:7.3f} s  {tokens / bare:8.0f} tok/s  "
          f"MFU {flops / bare / 1e9 / peak:5.1%}")
    for ranks in (1, 2):
        micro = min(d.micro_batch_size, d.global_batch_size // ranks)
        t = recipe_step_time(yaml_path, overrides + [f"max_duration={steps + 2}ba",
                                                     f"data.micro_batch_size={micro}"], ranks, workdir)
        extra = f"  overhead vs bare {t / bare - 1:+.1%}" if ranks == 1 else ""
        print(f"  composer -n {ranks} recipe : {t:7.3f} s  {tokens / t:8.0f} tok/s  "
              f"MFU {flops / t / 1e9 / peak:5.1%}{extra}")


def main() -> None:
    print(machine())
    peak = matmul_peak_gflops()
    print(f"measured fp32 matmul peak (2048^3 sgemm): {peak:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([sys.executable, "-m", "data.prepare", "--input",
                        str(ROOT / "data/corpus/tiny_corpus.jsonl"), "--output", str(data / "s256"),
                        "--seq-len", "256", "--no-progress"], check=True, cwd=ROOT, capture_output=True)
        subprocess.run([sys.executable, "-m", "data.prepare", "--input",
                        str(ROOT / "data/corpus/tiny_corpus.jsonl"), "--output", str(data / "s2048"),
                        "--seq-len", "2048", "--no-progress"], check=True, cwd=ROOT, capture_output=True)
        report("tiny.yaml", str(ROOT / "yamls/tiny.yaml"), [f"data.local={data / 's256'}"], 20, peak, work)
        report("mamba2-130m shape (24 layers, d_model 768)", str(ROOT / "yamls/tiny.yaml"),
               [f"data.local={data / 's2048'}", "data.seq_len=2048", "data.global_batch_size=2",
                "data.micro_batch_size=1", "model.d_model=768", "model.n_layer=24",
                "model.layer_pattern=null", "model.vocab_size=50277", "model.d_intermediate=0",
                "model.ssm_cfg={layer: Mamba2}", "model.attn_cfg={}", "model.pad_vocab_size_multiple=16"],
               3, peak, work)


if __name__ == "__main__":
    main()
