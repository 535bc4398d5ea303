"""CPU time of every Python process a command starts, grouped by what the process was.

    .venv/bin/python bench/cpu_audit.py -- .venv/bin/python -m pytest -q tests/test_train.py
    .venv/bin/python bench/cpu_audit.py --top 30 -- make test

For the length of the command, a .pth file in this venv's site-packages makes each Python process
of the venv record, when it exits normally, its argv, its own CPU time (user + sys, children not
included) and which heavy packages it had imported (torch_xla, composer, ...). Processes
killed by a signal or ended with os._exit record nothing. The .pth file is removed afterwards, also
after Ctrl-C. Only processes of this venv's interpreter are seen (tests pass it on via sys.executable).
How the numbers in BENCHMARKS.md's test-suite section were found (Inductor's compile-worker pools,
py-cpuinfo's subprocess per rank)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

HOOK = '''import os
if os.environ.get("MAMBA_CPU_AUDIT_DIR"):
    import atexit, json, resource, sys
    _audit_pid = os.getpid()

    def _audit_dump():
        if os.getpid() != _audit_pid:  # a forked child inherits the handler: it is not this process
            return
        r = resource.getrusage(resource.RUSAGE_SELF)
        heavy = [m for m in ("torch_xla", "neuronx_distributed", "composer", "transformers", "triton",
                             "streaming") if sys.modules.get(m) is not None]
        record = {"argv": sys.argv[:4], "cpu": r.ru_utime + r.ru_stime, "imported": heavy}
        with open(os.path.join(os.environ["MAMBA_CPU_AUDIT_DIR"], f"{_audit_pid}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(_audit_dump)
'''
NAME = "zz_mamba_cpu_audit"


def kind(argv: list[str]) -> str:
    """A short name for what a process was."""
    text = " ".join(argv)
    for marker, name in (("compile_worker", "Inductor compile worker"), ("cpuinfo", "py-cpuinfo --json"),
                         ("neuron/train.py", "neuron/train.py"), ("mamba/train.py", "mamba/train.py"),
                         ("torch.distributed.run", "torchrun"), ("pytest", "pytest")):
        if marker in text:
            return name
    if argv and argv[0].endswith("/composer"):
        return "composer launcher"
    return text[:70] or "(no argv)"


def report(folder: Path, top: int) -> str:
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, set()])
    for r in records:
        g = groups[kind(r["argv"])]
        g[0] += 1
        g[1] += r["cpu"]
        g[2].update(r["imported"])
    total = sum(r["cpu"] for r in records)
    lines = [f"{len(records)} Python processes, {total:.1f} s of CPU (user + sys, each process's own)",
             f"{'CPU s':>8} {'procs':>5}  kind  [heavy packages imported]"]
    for name, (n, cpu, heavy) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{cpu:8.1f} {n:5d}  {name}  [{', '.join(sorted(heavy))}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=20, help="kinds of process listed (default 20)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: give the command after --, e.g. -- .venv/bin/python -m pytest -q tests/test_train.py",
              file=sys.stderr)
        return 2
    site_packages = Path(site.getsitepackages()[0])
    module, pth = site_packages / f"{NAME}.py", site_packages / f"{NAME}.pth"
    if pth.exists():
        print(f"error: {pth} exists (another audit running, or one killed): remove it and retry",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cpu-audit-") as folder:
        module.write_text(HOOK)
        pth.write_text(f"import {NAME}\n")
        try:
            code = subprocess.call(command, env={**os.environ, "MAMBA_CPU_AUDIT_DIR": folder})
        finally:
            pth.unlink(missing_ok=True)
            module.unlink(missing_ok=True)
        print(report(Path(folder), args.top))
    return code


if __name__ == "__main__":
    sys.exit(main())
