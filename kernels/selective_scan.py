"""Mamba-1 selective scan: a compiled CPU kernel (C, built on first use) and a torch fallback.

The C kernel is plain C99 with no torch headers, so it builds in about a second with the
system compiler and is called through ctypes (which releases the GIL, so channel ranges run
on a thread pool). Where no compiler is available, or the tensors are not on the CPU, the
sequential torch recurrence below runs instead: same results, slower. On XLA devices the
dispatch asks for the chunked scan (kernels/selective_scan_chunked.py): the step loop would be
unrolled into the compiled graph, one copy per position.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from kernels import cbuild
from kernels.cbuild import ptr as _ptr
from kernels.selective_scan_chunked import scan_chunked

CHECKPOINT_EVERY = 64  # state checkpoints for the backward pass, every this many steps
_NAME = "selective_scan_cpu"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ss_forward.argtypes = [p] * 9 + [i64] * 15
    lib.ss_backward.argtypes = [p] * 13 + [i64] * 15


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


def _layout(M: torch.Tensor, batch: int, length: int) -> tuple[int, int, int, int]:
    """(groups, batch stride, group stride, time stride) of a compact B/C for the C kernel:
    [g, n] is constant over batch and time (g = dim), [b, g, l, n] varies."""
    if M.dim() == 2:
        return M.shape[0], 0, M.shape[1], 0
    g, n = M.shape[1], M.shape[3]
    return g, g * length * n, length * n, n


class _SelectiveScanC(torch.autograd.Function):
    """u, delta [b,d,l], A [d,n], B/C [b,g,l,n] or [d,n] (constant), seq_idx [b,l] int32 or None;
    all float32, contiguous, on the CPU (checked here, before any pointer reaches C)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, seq_idx):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        _check_c_inputs(u, delta, A, B, C, seq_idx)
        lib = _load()
        nck = -(-length // CHECKPOINT_EVERY)
        y = torch.empty_like(u)
        last = u.new_empty(batch, dim, dstate)
        ckpt = u.new_empty(batch, dim, nck, dstate)
        layout = (*_layout(B, batch, length), *_layout(C, batch, length))
        args = (_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(seq_idx), _ptr(y),
                _ptr(last), _ptr(ckpt), batch, dim, dstate, length, CHECKPOINT_EVERY, *layout)
        cbuild.parallel(lambda d0, d1: lib.ss_forward(*args, d0, d1), _ranges(dim))
        ctx.save_for_backward(u, delta, A, B, C, seq_idx, ckpt)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        lib = _load()
        u, delta, A, B, C, seq_idx, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate = A.shape[1]
        dy = dy.float().contiguous()
        cbuild.require("selective_scan (C backward)", "dy", dy, (batch, dim, length))
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = torch.zeros_like(A)
        ranges = _ranges(dim)
        dB = B.new_zeros(len(ranges), *B.shape)  # one partial sum per thread, laid out as B
        dC = C.new_zeros(len(ranges), *C.shape)
        layout = (*_layout(B, batch, length), *_layout(C, batch, length))

        def run(d0, d1):
            i = ranges.index((d0, d1))
            lib.ss_backward(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(seq_idx),
                            _ptr(ckpt), _ptr(dy), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB[i]),
                            _ptr(dC[i]), batch, dim, dstate, length, CHECKPOINT_EVERY, *layout,
                            d0, d1)

        cbuild.parallel(run, ranges)
        return du, ddelta, dA, dB.sum(0), dC.sum(0), None


def _check_c_inputs(u, delta, A, B, C, seq_idx):
    name = "selective_scan (C kernel)"
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"{name}: u must be [batch, dim, seqlen] and A [dim, dstate], "
                         f"got {tuple(u.shape)} and {tuple(A.shape)}")
    batch, dim, length = u.shape
    dstate = A.shape[1]
    cbuild.require(name, "u", u, (batch, dim, length))
    cbuild.require(name, "delta", delta, (batch, dim, length))
    cbuild.require(name, "A", A, (dim, dstate))
    for label, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            cbuild.require(name, label, M, (dim, dstate))
        else:
            groups = M.shape[1] if M.dim() == 4 else 0
            if groups < 1 or dim % groups:
                raise ValueError(f"{name}: {label} must be [dim, dstate] or [batch, groups, seqlen, "
                                 f"dstate] with groups dividing dim={dim}, got {tuple(M.shape)}")
            cbuild.require(name, label, M, (batch, groups, length, dstate))
    if seq_idx is not None:
        cbuild.require(name, "seq_idx", seq_idx, (batch, length), dtype=torch.int32)


def _scan_torch(u, delta, A, B, C, seq_idx):
    """Sequential recurrence in torch: u/delta [b,d,l], B/C [b,g,l,n] or [d,n] -> (y, last_state)."""
    batch, dim, length = u.shape

    def at(M, t):  # [b or 1, d, n] at time t
        if M.dim() == 2:
            return M[None]
        return M[:, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(u.dtype)[:, None, None]
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((state * at(C, t)).sum(-1))
    return torch.stack(ys, dim=-1), state


def _fail(message: str, error=ValueError):
    raise error(f"selective_scan_fn: {message}")


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, seq_idx=None, cu_seqlens=None):
    """Shapes, dtypes and devices of a selective_scan_fn call; a clear error for anything else."""
    for label, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                     ("delta_bias", delta_bias), ("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(f"{label} must be a tensor or None, got {type(t).__name__}", TypeError)
    if u.dim() != 3:
        _fail(f"u must be (batch, dim, seqlen), got {_shape(u)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        _fail(f"A must be (dim, dstate) with dim={dim}, got {_shape(A)}")
    dstate = A.shape[1]
    for label, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                     ("delta_bias", delta_bias)):
        if t is not None and t.is_complex():
            _fail(f"{label} is complex ({t.dtype}); only real scans are supported", TypeError)
        if t is not None and not t.is_floating_point():
            _fail(f"{label} must be a floating-point tensor, got {t.dtype}", TypeError)
    if _shape(delta) != (batch, dim, length):
        _fail(f"delta must have u's shape {(batch, dim, length)}, got {_shape(delta)}")
    for label, M in (("B", B), ("C", C)):
        ok = (M.dim() == 2 and _shape(M) == (dim, dstate)) or (
            M.dim() == 3 and _shape(M) == (batch, dstate, length)) or (
            M.dim() == 4 and M.shape[1] >= 1 and dim % M.shape[1] == 0
            and _shape(M) == (batch, M.shape[1], dstate, length))
        if not ok:
            _fail(f"{label} must be (dim, dstate)={(dim, dstate)}, (batch, dstate, seqlen)="
                  f"{(batch, dstate, length)} or (batch, ngroups, dstate, seqlen) with ngroups "
                  f"dividing dim={dim}; got {_shape(M)}")
    for label, t, want in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)),
                           ("z", z, (batch, dim, length))):
        if t is not None and _shape(t) != want:
            _fail(f"{label} must have shape {want}, got {_shape(t)}")
    for label, t in (("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
        if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            _fail(f"{label} must be an integer tensor, got {t.dtype}", TypeError)
    if seq_idx is not None and _shape(seq_idx) != (batch, length):
        _fail(f"seq_idx must have shape (batch, seqlen)={(batch, length)}, got {_shape(seq_idx)}")
    if cu_seqlens is not None:
        check_cu_seqlens("selective_scan_fn", cu_seqlens, length)
    for label, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                     ("delta_bias", delta_bias), ("seq_idx", seq_idx)):
        if t is not None and t.device != u.device:
            _fail(f"{label} is on {t.device} but u is on {u.device}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, length: int) -> None:
    """cu_seqlens [num_seqs + 1]: 0, increasing (empty sequences allowed), ending at seqlen."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be (num_sequences + 1,), got {_shape(cu_seqlens)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"{op}: cu_seqlens must start at 0, never decrease and end at seqlen="
                         f"{length}, got {cu}")


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, device) -> torch.Tensor:
    """[batch, seqlen] int32 document index of every position (every row cut the same way)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device, dtype=torch.int32),
                                  lengths)
    return row.expand(batch, -1).contiguous()


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, cu_seqlens=None, seq_idx=None, use_c_kernel=None,
                         chunked=False):
    """Same contract as mamba_ssm.ops.selective_scan_interface.selective_scan_fn (real A), plus
    seq_idx [b,l] (a change of value resets the state, as cu_seqlens boundaries do).

    u, delta, z: [b,d,l]; A: [d,n]; B, C: [d,n] (constant), [b,n,l] or [b,g,n,l]; D, delta_bias: [d].
    chunked: the chunked scan of kernels/selective_scan_chunked.py instead of the step loop (a graph
    of fixed size for XLA's compiler); an explicit use_c_kernel=True wins over it.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, seq_idx, cu_seqlens)
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, u.shape[0], u.device)
    dtype = u.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 accumulation at least
    uf, df = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        df = df + delta_bias.to(acc)[:, None]
    if delta_softplus:
        df = torch.where(df <= 20.0, F.softplus(df), df)

    def compact(M):  # [d,n] stays (constant); [b,n,l] / [b,g,n,l] -> [b,g,l,n]
        if M.dim() == 2:
            return M.to(acc).contiguous()
        return (M[:, None] if M.dim() == 3 else M).to(acc).transpose(-1, -2).contiguous()

    Bg, Cg = compact(B), compact(C)
    if use_c_kernel is None:
        use_c_kernel = (u.device.type == "cpu" and acc == torch.float32 and not chunked
                        and c_kernel_available())
    if use_c_kernel:
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        y, last = _SelectiveScanC.apply(uf.contiguous(), df.contiguous(), A.to(acc).contiguous(),
                                        Bg, Cg, seq)
    elif chunked:
        y, last = scan_chunked(uf, df, A.to(acc), Bg, Cg, seq_idx)
    else:
        y, last = _scan_torch(uf, df, A.to(acc), Bg, Cg, seq_idx)
    if D is not None:
        y = y + uf * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype)
    return (y, last) if return_last_state else y


def mamba_inner_torch(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                      out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                      C_proj_bias=None, delta_softplus=True, *, checkpoint_lvl=1, cu_seqlens=None,
                      seq_idx=None, chunked=False):
    """mamba_ssm's mamba_inner_fn (a whole Mamba-1 mixer after in_proj) composed of our ops:
    conv -> x_proj -> dt_proj -> selective scan (gated by z) -> out_proj. xz [b, 2*d, l];
    conv1d_weight [d, 1, w] or [d, w]; x_proj_weight [r + n*(B is None) + n*(C is None), d] (dt rows
    first, then B's, then C's last); delta_proj_weight [d, r]; out_proj_weight [o, d]; A [d, n];
    B/C None (taken from x_proj) or any selective_scan_fn form. Extra x_proj rows are
    ignored, as upstream does (B from rows [r, r+n), C from the last n). Returns [b, l, o]. checkpoint_lvl
    is accepted for compatibility (autograd keeps what it needs here); chunked as in selective_scan_torch."""
    from kernels.conv1d import causal_conv1d_torch

    if not isinstance(xz, torch.Tensor) or xz.dim() != 3 or A.dim() != 2 or xz.shape[1] != 2 * A.shape[0]:
        _fail_inner(f"xz must be (batch, 2 * dim, seqlen) with dim={A.shape[0]} (A's rows), got "
                    f"{_shape(xz)}")
    dim, dstate = A.shape
    rank = delta_proj_weight.shape[-1] if delta_proj_weight.dim() == 2 else -1
    needed = rank + dstate * ((B is None) + (C is None))
    width = conv1d_weight.shape[-1]
    if _shape(conv1d_weight) not in ((dim, width), (dim, 1, width)):
        _fail_inner(f"conv1d_weight must be (dim, 1, width) or (dim, width) with dim={dim}, got "
                    f"{_shape(conv1d_weight)}")
    if rank < 1 or delta_proj_weight.shape[0] != dim:
        _fail_inner(f"delta_proj_weight must be ({dim}, dt_rank), got {_shape(delta_proj_weight)}")
    if x_proj_weight.dim() != 2 or x_proj_weight.shape[1] != dim or x_proj_weight.shape[0] < needed:
        _fail_inner(f"x_proj_weight must be (dt_rank + dstate per B/C taken from it, dim)=({needed}, {dim}), "
                    f"got {_shape(x_proj_weight)}")
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != dim:
        _fail_inner(f"out_proj_weight must be (out_dim, {dim}), got {_shape(out_proj_weight)}")
    for label, t, want in (("B_proj_bias", B_proj_bias, (dstate,)), ("C_proj_bias", C_proj_bias, (dstate,)),
                           ("out_proj_bias", out_proj_bias, out_proj_weight.shape[:1])):
        if t is not None and _shape(t) != tuple(want):
            _fail_inner(f"{label} must have shape {tuple(want)}, got {_shape(t)}")
    length = xz.shape[-1]
    if cu_seqlens is not None and seq_idx is None:
        check_cu_seqlens("mamba_inner_fn", cu_seqlens, length)
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, xz.shape[0], xz.device)
    x, z = xz.chunk(2, dim=1)
    weight = conv1d_weight.reshape(dim, conv1d_weight.shape[-1])
    x = causal_conv1d_torch(x, weight, conv1d_bias, seq_idx=seq_idx, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # [b, l, needed]
    delta = F.linear(x_dbl[..., :rank], delta_proj_weight).transpose(1, 2)  # [b, d, l]
    if B is None:
        B = x_dbl[..., rank:rank + dstate]
        B = (B if B_proj_bias is None else B + B_proj_bias.to(B.dtype)).transpose(1, 2)
    if C is None:
        C = x_dbl[..., x_dbl.shape[-1] - dstate:]
        C = (C if C_proj_bias is None else C + C_proj_bias.to(C.dtype)).transpose(1, 2)
    y = selective_scan_torch(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                             seq_idx=seq_idx, chunked=chunked)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def _fail_inner(message: str):
    raise ValueError(f"mamba_inner_fn: {message}")
