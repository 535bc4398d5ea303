"""Where a tiny.yaml training step's time goes with different CPU thread settings, on a quiet
machine and under a competing CPU load (one busy-loop process per CPU), measured side by side.

Run: .venv/bin/python bench/bench_threads.py [--steps 6] [--rounds 2] [--settings old,one,recipe]

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads it):
  old     threads = os.cpu_count(), OpenMP's default wait policy (the recipe before this bench)
  one     OMP_NUM_THREADS=1
  recipe  what mamba/train.py does now: threads from os.sched_getaffinity, OMP_WAIT_POLICY=PASSIVE
  active  threads from affinity, OMP_WAIT_POLICY=ACTIVE (waiting threads spin: the worst case)
  spin    threads from affinity, GOMP_SPINCOUNT=10000 (a short spin, then sleep; libgomp only)
Per step: wall time split into forward / backward / optimizer, process CPU time (user+sys; a
spinning OpenMP thread shows up as CPU time beyond the work), and involuntary context switches.
A separate probe measures the CPU that idle OpenMP threads burn between parallel regions, which
shows whether the wait policy took effect. Rounds alternate quiet and loaded runs so that a
change in other processes' load on a shared machine hits both columns alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("old", "one", "recipe", "active", "spin")


# ---- the measured process --------------------------------------------------------------------
def child(setting: str, steps: int, budget: float) -> dict:
    if setting == "recipe":
        sys.path.insert(0, str(ROOT))
        import mamba.train as recipe  # sets OMP_WAIT_POLICY before torch loads OpenMP

        threads = recipe.configure_cpu_threads()
    else:
        if setting == "active":
            os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        elif setting == "spin":
            os.environ["GOMP_SPINCOUNT"] = "10000"
        elif setting == "one":
            os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        sys.path.insert(0, str(ROOT))
        threads = {"old": os.cpu_count() or 1, "one": 1}.get(setting, len(os.sched_getaffinity(0)))
        torch.set_num_threads(threads)
    import torch
    import torch.nn.functional as F

    from mamba.model import MambaLMHeadModel
    from mamba.train_config import load_yaml, parse_config

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg = parse_config(load_yaml(str(ROOT / "yamls" / "tiny.yaml")))
    model = MambaLMHeadModel(cfg.model.mamba_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, 256, (cfg.data.micro_batch_size, cfg.data.seq_len))
    rows: list[dict] = []
    started = time.perf_counter()
    for i in range(steps + 1):
        if len(rows) >= 2 and time.perf_counter() - started > budget:
            break  # a very slow setting: enough steps to see it
        usage0, cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        if i > 0:  # the first step warms up allocators and kernels
            rows.append({"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                         "cpu": time.process_time() - cpu0, "nivcsw": usage1.ru_nivcsw - usage0.ru_nivcsw})
    # idle probe: small parallel ops with 5 ms sleeps between them; the CPU time the process
    # uses while its main thread sleeps is OpenMP workers waiting for work (spinning)
    a = torch.randn(512, 512)
    idle_cpu = idle_wall = 0.0
    for _ in range(40):
        a @ a
        c0, t0 = time.process_time(), time.perf_counter()
        time.sleep(0.005)
        idle_cpu += time.process_time() - c0
        idle_wall += time.perf_counter() - t0
    return {"setting": setting, "threads": torch.get_num_threads(),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY") or (
                f"spin {os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else "(default)"),
            "median": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
            "max_step": max(r["step"] for r in rows), "idle_cpu_per_idle_s": idle_cpu / idle_wall,
            "steps": len(rows)}


# ---- the competing load -------------------------------------------------------------------------
def start_load(seconds: float) -> list[subprocess.Popen]:
    """One busy-loop process per CPU this process may use; each exits by itself after `seconds`."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in os.sched_getaffinity(0)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def run_child(setting: str, steps: int, loaded: bool, timeout: float, budget: float) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    load = start_load(timeout) if loaded else []
    try:
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--steps", str(steps),
                              "--budget", str(budget)],
                             capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        stop_load(load)
    if out.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settings", default="old,one,recipe,active")
    ap.add_argument("--budget", type=float, default=40.0, help="stop a setting's steps after this long")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per measured process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.budget)))
        return
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    cpus = len(os.sched_getaffinity(0))
    print(f"cpus: {os.cpu_count()} (affinity {cpus}); load average before: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; tiny.yaml step: 16 x 256 tokens, fp32")
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for setting in settings:
            order = (False, True) if r % 2 == 0 else (True, False)
            for loaded in order:
                res = run_child(setting, args.steps, loaded, args.timeout, args.budget)
                results.setdefault((setting, loaded), []).append(res)
                print(f"  round {r + 1} {setting:6s} {'loaded' if loaded else 'quiet ':6s} "
                      f"step {res['median']['step']:.3f} s (max {res['max_step']:.3f})", flush=True)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = ("setting", "threads", "wait policy", "quiet s/step", "loaded s/step", "loaded/quiet",
              "loaded fwd/bwd/opt s", "CPU s/step quiet, loaded", "invol. switches/step loaded",
              "idle CPU s/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    summary = []
    for setting in settings:
        quiet, loaded = results[(setting, False)], results[(setting, True)]

        def med(runs, key):
            return statistics.median(x["median"][key] for x in runs)

        q, lo = med(quiet, "step"), med(loaded, "step")
        phase = "/".join(f"{med(loaded, k):.2f}" for k in ("forward", "backward", "optimizer"))
        spin = statistics.median(x["idle_cpu_per_idle_s"] for x in quiet)
        print(f"| {setting} | {quiet[0]['threads']} | {quiet[0]['wait_policy']} | {q:.3f} | {lo:.3f} | "
              f"{lo / q:.1f}x | {phase} | {med(quiet, 'cpu'):.2f}, {med(loaded, 'cpu'):.2f} | "
              f"{med(loaded, 'nivcsw'):.0f} | {spin:.2f} |")
        summary.append({"setting": setting, "quiet_s": q, "loaded_s": lo, "runs": quiet + loaded})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
