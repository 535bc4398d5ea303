"""Mamba-1 selective scan: a compiled CPU kernel (C, built on first use) and a torch fallback.

The C kernel is plain C99 with no torch headers, so it builds in about a second with the
system compiler and is called through ctypes (which releases the GIL, so channel ranges run
on a thread pool). Where no compiler is available, or the tensors are not on the CPU, the
sequential torch recurrence below runs instead: same results, slower.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

_SRC = Path(__file__).parent / "csrc" / "selective_scan_cpu.c"
_CFLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC", "-shared", "-std=c99"]
CHECKPOINT_EVERY = 64  # state checkpoints for the backward pass, every this many steps
_lib = None
_lib_error: str | None = None
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _build_dir() -> Path:
    root = os.environ.get("MAMBA_KERNELS_BUILD_DIR")
    return Path(root) if root else Path(__file__).parent / "_build"


def _cpu_fingerprint() -> str:
    # -march=native output is only valid on the same kind of CPU (shared file systems!).
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build_library(verbose: bool = False) -> Path:
    """Compile the C kernel (if not already built for this source and CPU) and return its path."""
    source = _SRC.read_bytes()
    key = hashlib.sha1(source + " ".join(_CFLAGS).encode() + _cpu_fingerprint().encode())
    target = _build_dir() / f"selective_scan_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_CFLAGS, str(_SRC), "-o", str(out), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_SRC.name} failed: {result.stderr.strip()[:500]}")
        os.replace(out, target)  # atomic: concurrent ranks never load a half-written file
    if verbose:
        print(f"built {target}")
    return target


def _load():
    global _lib, _lib_error, _pool
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            if os.environ.get("MAMBA_KERNELS_NO_C") == "1":
                _lib_error = "disabled by MAMBA_KERNELS_NO_C=1"
                return None
            try:
                lib = ctypes.CDLL(str(build_library()))
            except (RuntimeError, OSError) as exc:
                _lib_error = str(exc)
                return None
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.ss_forward.argtypes = [ptr] * 9 + [i64] * 8
            lib.ss_backward.argtypes = [ptr] * 13 + [i64] * 8
            _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
            _lib = lib
    return _lib


def c_kernel_available() -> bool:
    return _load() is not None


def c_kernel_error() -> str | None:
    _load()
    return _lib_error


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _ranges(dim: int) -> list[tuple[int, int]]:
    parts = max(1, min(torch.get_num_threads(), dim))
    step = -(-dim // parts)
    return [(s, min(dim, s + step)) for s in range(0, dim, step)]


class _SelectiveScanC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, seq_idx):
        lib = _load()
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[3]
        nck = -(-length // CHECKPOINT_EVERY)
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, dstate)
        ckpt = u.new_empty(batch, dim, nck, dstate)
        args = (_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(seq_idx), _ptr(y),
                _ptr(last), _ptr(ckpt), batch, dim, dstate, length, groups, CHECKPOINT_EVERY)
        list(_pool.map(lambda r: lib.ss_forward(*args, *r), _ranges(dim)))
        ctx.save_for_backward(u, delta, A, B, C, seq_idx, ckpt)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        lib = _load()
        u, delta, A, B, C, seq_idx, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[3]
        dy = dy.float().contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = torch.zeros_like(A)
        ranges = _ranges(dim)
        dB = B.new_zeros(len(ranges), *B.shape)  # one partial sum per thread
        dC = C.new_zeros(len(ranges), *C.shape)

        def run(i):
            d0, d1 = ranges[i]
            lib.ss_backward(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(seq_idx),
                            _ptr(ckpt), _ptr(dy), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB[i]),
                            _ptr(dC[i]), batch, dim, dstate, length, groups, CHECKPOINT_EVERY,
                            d0, d1)

        list(_pool.map(run, range(len(ranges))))
        return du, ddelta, dA, dB.sum(0), dC.sum(0), None


def _scan_torch(u, delta, A, B, C, seq_idx):
    """Sequential recurrence in torch: u/delta [b,d,l], B/C [b,g,l,n] -> (y, last_state)."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    Bd = B.repeat_interleave(dim // groups, dim=1)  # [b,d,l,n]
    Cd = C.repeat_interleave(dim // groups, dim=1)
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(u.dtype)[:, None, None]
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * Bd[:, :, t]
        ys.append((state * Cd[:, :, t]).sum(-1))
    return torch.stack(ys, dim=-1), state


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, seq_idx=None, use_c_kernel=None):
    """Same contract as mamba_ssm.ops.selective_scan_interface.selective_scan_fn, plus seq_idx [b,l].

    u, delta, z: [b,d,l]; A: [d,n]; B, C: [b,n,l] or [b,g,n,l]; D, delta_bias: [d].
    """
    dtype = u.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 accumulation at least
    uf, df = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        df = df + delta_bias.to(acc)[:, None]
    if delta_softplus:
        df = torch.where(df <= 20.0, F.softplus(df), df)
    Bg = (B[:, None] if B.dim() == 3 else B).to(acc).transpose(-1, -2).contiguous()  # [b,g,l,n]
    Cg = (C[:, None] if C.dim() == 3 else C).to(acc).transpose(-1, -2).contiguous()
    if use_c_kernel is None:
        use_c_kernel = u.device.type == "cpu" and acc == torch.float32 and c_kernel_available()
    if use_c_kernel:
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        y, last = _SelectiveScanC.apply(uf.contiguous(), df.contiguous(), A.to(acc).contiguous(),
                                        Bg, Cg, seq)
    else:
        y, last = _scan_torch(uf, df, A.to(acc), Bg, Cg, seq_idx)
    if D is not None:
        y = y + uf * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype)
    return (y, last) if return_last_state else y
