"""The dispatch point and the C kernel's build and fallback."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels import backend_for

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_tensors_use_torch_paths(monkeypatch):
    for op in ("ssd", "scan", "conv1d", "conv1d_update", "state_update"):
        assert backend_for(op, torch.device("cpu")) == "torch"
    monkeypatch.setenv("MAMBA_KERNELS", "torch")
    assert backend_for("ssd", torch.device("cuda")) == "torch"


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


CHECK = """
import torch
from kernels.selective_scan import c_kernel_available, c_kernel_error, selective_scan_torch
u, d = torch.randn(1, 4, 9), torch.rand(1, 4, 9)
A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 9), torch.randn(1, 3, 9)
y = selective_scan_torch(u, d, A, B, C)
ref = selective_scan_torch(u, d, A, B, C, use_c_kernel=False)
print(c_kernel_available(), c_kernel_error(), float((y - ref).abs().max()) < 1e-5)
"""


def test_c_kernel_builds_into_a_fresh_folder(tmp_path):
    result = run_python(CHECK, MAMBA_KERNELS_BUILD_DIR=str(tmp_path))
    assert result.stdout.split() == ["True", "None", "True"], result.stderr
    built = list(tmp_path.glob("selective_scan_cpu_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no half-written leftovers


def test_without_the_c_kernel_the_torch_scan_runs(tmp_path):
    result = run_python(CHECK, MAMBA_KERNELS_NO_C="1", MAMBA_KERNELS_BUILD_DIR=str(tmp_path))
    assert result.stdout.split()[0] == "False" and result.stdout.split()[-1] == "True", result.stderr
    result = run_python(CHECK, CC="/nonexistent/cc", MAMBA_KERNELS_BUILD_DIR=str(tmp_path / "b"))
    assert result.stdout.startswith("False compiling") or result.stdout.startswith("False"), result
    assert result.stdout.split()[-1] == "True"


def test_xla_without_the_neuron_compiler_uses_torch() -> None:
    """NKI serves XLA tensors only when the real neuronxcc imports (never our NumPy executor)."""
    from kernels import backend_for
    from kernels.nki import nki_available

    assert not nki_available()
    for op in ("ssd", "conv1d", "norm_gated"):
        assert backend_for(op, torch.device("xla")) == "torch"
    assert backend_for("scan", torch.device("xla")) == "chunked"  # the chunked torch scan


def test_cuda_backends_in_order_and_forced(monkeypatch):
    import pytest

    from kernels import triton as triton_kernels
    from kernels.dispatch import _HAS_MAMBA_SSM, backends_for

    cuda = torch.device("cuda")  # a device object; no GPU needed to ask
    monkeypatch.delenv("MAMBA_KERNELS", raising=False)
    ext = ["cuda-ext"] if _HAS_MAMBA_SSM else []
    ours = ["triton"] if triton_kernels.available() else []
    assert backends_for("scan", cuda) == ext + ours + ["torch"]
    assert backends_for("state_update", cuda) == ext + ["torch"]  # no Triton kernel for it
    monkeypatch.setenv("MAMBA_KERNELS", "triton")
    assert backends_for("scan", cuda) == ours + ["torch"]
    assert backends_for("scan", torch.device("cpu")) == ["torch"]
    monkeypatch.setenv("MAMBA_KERNELS", "cuda-ext")
    assert backends_for("ssd", cuda) == ext + ["torch"]
    monkeypatch.setenv("MAMBA_KERNELS", "fast")
    with pytest.raises(ValueError, match="MAMBA_KERNELS='fast'"):
        backends_for("scan", cuda)
