"""Mamba-1 selective scan: a compiled CPU kernel (C, built on first use) and a torch fallback.

The C kernel is plain C99 with no torch headers, so it builds in about a second with the
system compiler and is called through ctypes (which releases the GIL, so channel ranges run
on a thread pool). Where no compiler is available, or the tensors are not on the CPU, the
sequential torch recurrence below runs instead: same results, slower.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from kernels import cbuild
from kernels.cbuild import ptr as _ptr

CHECKPOINT_EVERY = 64  # state checkpoints for the backward pass, every this many steps
_NAME = "selective_scan_cpu"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ss_forward.argtypes = [p] * 9 + [i64] * 8
    lib.ss_backward.argtypes = [p] * 13 + [i64] * 8


def _load():
    return cbuild.load(_NAME, _declare)


def build_library(verbose: bool = False):
    return cbuild.build_library(_NAME, verbose=verbose)


def c_kernel_available() -> bool:
    return _load() is not None


def c_kernel_error() -> str | None:
    _load()
    return cbuild.error(_NAME)


def _ranges(dim: int) -> list[tuple[int, int]]:
    return cbuild.split(dim)


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
        cbuild.parallel(lambda d0, d1: lib.ss_forward(*args, d0, d1), _ranges(dim))
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

        def run(d0, d1):
            i = ranges.index((d0, d1))
            lib.ss_backward(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(seq_idx),
                            _ptr(ckpt), _ptr(dy), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB[i]),
                            _ptr(dC[i]), batch, dim, dstate, length, groups, CHECKPOINT_EVERY,
                            d0, d1)

        cbuild.parallel(run, ranges)
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
