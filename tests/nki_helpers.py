"""Inputs and comparisons shared by tests/test_nki_kernels.py (float64 references)."""

from __future__ import annotations

import torch

from kernels.reference import causal_conv1d_ref, ssd_ref


def docs(batch, length, starts):
    """seq_idx [b, l] int32 with documents starting at the given positions (per row)."""
    seq = torch.zeros(batch, length, dtype=torch.int32)
    for row, row_starts in enumerate(starts):
        for s in row_starts:
            seq[row, s:] += 1
    return seq


def close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= tol * max(1.0, scale), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def close_bf16(a, ref, what):
    """a is bf16 and each element within one bf16 rounding of the float64 reference: |a - ref| <=
    2**-8 |ref| (half a bf16 step is 2**-9; the rest covers fp32 work before the rounding) plus
    1e-5 of the largest value (elements near zero, where fp32 cancellation dominates)."""
    assert a.dtype == torch.bfloat16, f"{what}: {a.dtype}, expected bfloat16"
    ref = ref.detach().double()
    err = (a.double() - ref).abs()
    bound = 2.0**-8 * ref.abs() + 1e-5 * max(1.0, ref.abs().max().item())
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst].item():.3g} at a value "
                                  f"{ref.flatten()[worst].item():.3g} is more than one bf16 rounding")


def conv_case(batch, dim, length, width, bias, seq_idx, silu, dtype=torch.float32):
    x = torch.randn(batch, dim, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dim, width, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, dtype=torch.float64, requires_grad=True) if bias else None
    act = "silu" if silu else None
    y_ref, _ = causal_conv1d_ref(x, w, b, seq_idx=seq_idx, activation=act)
    dy = torch.randn_like(y_ref)
    leaves = [t for t in (x, w, b) if t is not None]
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    ours = [t.detach().to(dtype).requires_grad_() for t in leaves]
    return y_ref, grads_ref, ours, dy, act


def ssd_inputs(batch, length, nheads, headdim, ngroups, dstate, d_per_channel):
    f = dict(dtype=torch.float64)
    x = torch.randn(batch, length, nheads, headdim, **f)
    # slow decays (|dt*A| ~ 0.02 per token), so the state carried between chunks matters
    dt = torch.rand(batch, length, nheads, **f) * 0.04 + 0.002
    A = -torch.rand(nheads, **f) * 1.5 - 0.05
    B = torch.randn(batch, length, ngroups, dstate, **f)
    C = torch.randn(batch, length, ngroups, dstate, **f)
    D = torch.randn(nheads * headdim if d_per_channel else nheads, **f)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def ssd_reference(x, dt, A, B, C, D, seq_idx, z=None, dt_bias=None, dt_softplus=False):
    Dr = D.view(x.shape[2], x.shape[3]) if D.numel() != x.shape[2] else D
    return ssd_ref(x, dt, A, B, C, D=Dr, z=z, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=dt_softplus)[0]
