"""What a fresh process pays to start and to end: importing torch, Composer with torch_xla
installed beside it (the Composer recipe and neuron/ share one environment here), and Composer
with torch_xla hidden the way mamba/train.py's entry hides it; the same ending with the GC frozen
(as both train.py entries end: the interpreter's last collection skips what was imported); and
torch_xla with and without Inductor's compile-worker pool started at import (TORCH_WARM_POOL=0,
as neuron/train.py and the tests set it; the pool's processes count in the CPU column).

Run: .venv/bin/python bench/bench_startup.py [--rounds 3]

Each case runs in its own fresh interpreter; rounds interleave the cases so that a change in
the machine's load hits all of them alike. Reported per case: median wall seconds and median
CPU seconds (user+sys of the child, from wait4), and the CPU ratio against "composer".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HIDDEN = "import sys; sys.modules.setdefault('torch_xla', None); import composer"
CASES = {  # name: (code, environment changes)
    "torch": ("import torch", {}),
    "composer": ("import composer", {"TORCH_WARM_POOL": "1"}),
    "composer, torch_xla hidden": (HIDDEN, {}),
    "  + gc.freeze() before exit": (HIDDEN + "; import gc; gc.freeze()", {}),
    "torch_xla": ("import torch_xla", {"TORCH_WARM_POOL": "1"}),
    "torch_xla, TORCH_WARM_POOL=0": ("import torch_xla", {"TORCH_WARM_POOL": "0"}),
}


def run_once(code: str, env: dict[str, str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: `{code}` failed in a fresh interpreter; run it by hand to see why")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds {args.rounds}: give 1 or more")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, (code, env) in CASES.items():
            results[name].append(run_once(code, env))
    base = statistics.median(cpu for _, cpu in results["composer"])
    print(f"{'case':30s} {'wall s':>7s} {'cpu s':>7s} {'cpu / composer':>15s}"
          f"   ({args.rounds} rounds, medians)")
    for name, rows in results.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name:30s} {wall:7.2f} {cpu:7.2f} {cpu / base:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
