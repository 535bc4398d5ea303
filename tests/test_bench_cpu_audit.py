"""bench/cpu_audit.py: every Python process of the venv that a command starts is counted, with its
CPU time and parent; the hook it puts into site-packages is gone afterwards."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', 'import json']))"


@pytest.mark.skipif("MAMBA_CPU_AUDIT_DIR" in os.environ, reason="this run is itself audited (one at a time)")
def test_counts_a_command_and_its_children_and_removes_its_hook():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_audit.py"), "--", sys.executable, "-c",
                          CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2 Python processes, "), out.stdout  # the command and its child
    assert not list(Path(site.getsitepackages()[0]).glob("zz_mamba_cpu_audit*"))


def test_no_command_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_audit.py")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "give the command after --" in out.stderr
