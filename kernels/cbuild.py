"""Build and load the small C kernels in kernels/csrc/ (plain C99, no torch headers).

Each source compiles in about a second with the system compiler on first use, into
kernels/_build/ (or $MAMBA_KERNELS_BUILD_DIR), named by a hash of the source, the flags and the
CPU (so a shared file system never hands one CPU another's -march=native build). The library is
called through ctypes, which releases the GIL, so row or channel ranges run on a thread pool.
MAMBA_KERNELS_NO_C=1 disables every C kernel; callers then use their torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC", "-shared", "-std=c99", "-pthread"]
SOURCES = ("selective_scan_cpu", "decode_cpu")

_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def build_dir() -> Path:
    root = os.environ.get("MAMBA_KERNELS_BUILD_DIR")
    return Path(root) if root else Path(__file__).parent / "_build"


def _cpu_fingerprint() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build_library(name: str, verbose: bool = False) -> Path:
    """Compile csrc/{name}.c (unless already built for this source and CPU); return the .so path."""
    src = CSRC / f"{name}.c"
    key = hashlib.sha1(src.read_bytes() + " ".join(CFLAGS).encode() + _cpu_fingerprint().encode())
    target = build_dir() / f"{name}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *CFLAGS, str(src), "-o", str(out), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed: {result.stderr.strip()[:500]}")
        os.replace(out, target)  # atomic: concurrent ranks never load a half-written file
    if verbose:
        print(f"built {target}")
    return target


def build_all(verbose: bool = False) -> None:
    for name in SOURCES:
        build_library(name, verbose=verbose)


def load(name: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The loaded library, or None (reason in `error(name)`); `declare` sets argtypes once."""
    if name in _libs:
        return _libs[name]
    global _pool
    with _lock:
        if name not in _libs:
            lib = None
            if os.environ.get("MAMBA_KERNELS_NO_C") == "1":
                _errors[name] = "disabled by MAMBA_KERNELS_NO_C=1"
            else:
                try:
                    lib = ctypes.CDLL(str(build_library(name)))
                    declare(lib)
                except (RuntimeError, OSError) as exc:
                    _errors[name], lib = str(exc), None
            if lib is not None and _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
            _libs[name] = lib
    return _libs[name]


def error(name: str) -> str | None:
    return _errors.get(name)


def ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def require(kernel: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...],
            dtype: torch.dtype = torch.float32, strides: tuple[int, ...] | None = None) -> None:
    """The last gate before a pointer goes to C: `t` is a CPU tensor of exactly this shape and
    dtype, contiguous (or with exactly these element strides). Raises ValueError/TypeError naming
    the argument, what was expected and what was found."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{kernel}: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{kernel}: {name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{kernel}: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{kernel}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    want = strides if strides is not None else torch.empty(shape, device="meta").stride()
    if t.numel() > 0 and any(s != w for s, w, n in zip(t.stride(), want, shape, strict=True) if n > 1):
        raise ValueError(f"{kernel}: {name} must have strides {tuple(want)}, got {t.stride()}")


def split(total: int) -> list[tuple[int, int]]:
    """[0, total) in one contiguous range per thread."""
    if total <= 0:
        return []  # nothing to do (batch or channels 0)
    parts = max(1, min(torch.get_num_threads(), total))
    step = -(-total // parts)
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def parallel(fn: Callable[[int, int], object], ranges: list[tuple[int, int]]) -> None:
    """fn(start, stop) for every range: all but the last on the pool, the last on this thread."""
    if len(ranges) <= 1:
        for r in ranges:
            fn(*r)
        return
    futures = [_pool.submit(fn, *r) for r in ranges[:-1]]
    fn(*ranges[-1])
    for f in futures:
        f.result()
