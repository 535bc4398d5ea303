"""First training step on torch-xla's CPU device (graph tracing + compilation + one run) of a
one-Mamba-1-layer model, against seq_len, for the old step-loop scan and the chunked scan.

Run: PJRT_DEVICE=CPU .venv/bin/python bench/bench_xla_compile.py [--lengths 64,256,1024,2048]
     [--paths loop,chunked] [--limit 180] [--threads 1]

Each (path, seq_len) runs in a fresh process (torch-xla caches compiled graphs per process):
  loop     MAMBA_KERNELS=torch: the sequential torch recurrence, unrolled once per position
  chunked  the default on XLA: kernels/selective_scan_chunked.py
A run over --limit wall seconds is stopped, and a path skips longer lengths after that or after a
first step over --max-cpu CPU seconds (process CPU time: less disturbed than wall time by other
processes on a shared machine). Both
paths alternate per length so that load from other processes hits them alike. Reported per run:
the first step (forward, cross entropy, backward, SGD update, mark_step, loss to the host), the
second step (already compiled: the run time alone), and the lowered graph's op count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

PATHS = ("loop", "chunked")


def child(seq_len: int) -> dict:
    import torch
    import torch.nn.functional as F
    import torch_xla
    import torch_xla.core.xla_model as xm

    from kernels import backends_for
    from mamba.model import MambaConfig, MambaLMHeadModel

    device = torch_xla.device()
    config = MambaConfig(vocab_size=256, d_model=64, n_layer=1, layer_pattern="m", ssm_cfg={"d_state": 16},
                         pad_vocab_size_multiple=8)
    torch.manual_seed(0)
    model = MambaLMHeadModel(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, seq_len + 1), generator=g)
    seq_idx = (torch.arange(seq_len) >= seq_len // 3).int().expand(2, -1)  # two packed documents
    inputs, targets, seq_idx = ids[:, :-1].to(device), ids[:, 1:].to(device), seq_idx.to(device)

    def step(count_ops: bool = False):
        out = model(inputs, seq_idx=seq_idx)
        logits = getattr(out, "logits", out)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        ops = None
        if count_ops:
            grads = [p.grad for p in model.parameters()]
            hlo = torch_xla._XLAC._get_xla_tensors_hlo([loss] + grads)
            ops = sum(" = " in line for line in hlo.splitlines())
        optimizer.zero_grad(set_to_none=True)
        xm.mark_step()
        return loss.item(), ops

    start, cpu = time.perf_counter(), time.process_time()
    loss, _ = step()
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    _, ops = step(count_ops=True)
    return {"backend": backends_for("scan", device)[0], "first_s": first, "first_cpu_s": first_cpu,
            "second_s": second,
            "hlo_ops": ops, "loss": loss}


def run(path: str, seq_len: int, limit: float, threads: int) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("MAMBA_KERNELS", None)
    if path == "loop":
        env["MAMBA_KERNELS"] = "torch"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(seq_len)], env=env,
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        raise SystemExit(f"{path} at seq_len {seq_len} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="64,256,1024,2048")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--limit", type=float, default=400.0, help="wall seconds before a run is stopped")
    parser.add_argument("--max-cpu", type=float, default=180.0,
                        help="a path whose first step took more CPU seconds than this skips longer lengths")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"--paths: unknown {unknown}; use some of {','.join(PATHS)}", file=sys.stderr)
        sys.exit(2)
    print(f"# {machine()}; each run OMP_NUM_THREADS={args.threads}, limit {args.limit:.0f} s wall, "
          f"longer lengths skipped after a first step over {args.max_cpu:.0f} CPU s")
    print("| seq_len | path | scan backend | first step wall (s) | first step CPU (s) | second step (s) "
          "| HLO ops (fwd+bwd) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    stopped: set[str] = set()
    for seq_len in (int(s) for s in args.lengths.split(",")):
        for path in paths:
            if path in stopped:
                print(f"| {seq_len} | {path} | | not run (stopped at a shorter length) | | | |")
                continue
            r = run(path, seq_len, args.limit, args.threads)
            if r.get("timed_out"):
                stopped.add(path)
                print(f"| {seq_len} | {path} | | > {args.limit:.0f} (stopped) | | | |", flush=True)
                continue
            if r["first_cpu_s"] > args.max_cpu:
                stopped.add(path)
            print(f"| {seq_len} | {path} | {r['backend']} | {r['first_s']:.1f} | {r['first_cpu_s']:.1f} "
                  f"| {r['second_s']:.2f} | {r['hlo_ops']} |", flush=True)


if __name__ == "__main__":
    main()
