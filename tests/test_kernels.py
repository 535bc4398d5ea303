"""Every kernel against the plain sequential recurrences in float64 (kernels.reference)."""

import math

import pytest
import torch

from kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)
from kernels.reference import causal_conv1d_ref, selective_scan_ref, ssd_ref
from kernels.selective_scan import c_kernel_available, c_kernel_error, selective_scan_torch
from kernels.ssd import ssd_scan

f64 = torch.float64


def docs(lengths, batch=1):
    """seq_idx for one row made of documents of the given lengths."""
    row = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    return row.expand(batch, -1).contiguous()


def close(a, b, rtol=2e-4, atol=2e-5):
    scale = b.abs().max().clamp(min=1.0)
    assert (a.double() - b.double()).abs().max() <= atol + rtol * scale, \
        f"max diff {(a.double() - b.double()).abs().max():.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------- Mamba-2 SSD
def ssd_inputs(b, l, h, p, g, n, dtype=f64):
    return dict(x=torch.randn(b, l, h, p, dtype=dtype), dt=torch.randn(b, l, h, dtype=dtype),
                A=-torch.rand(h, dtype=dtype) * 3 - 0.1, B=torch.randn(b, l, g, n, dtype=dtype),
                C=torch.randn(b, l, g, n, dtype=dtype))


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", [
    (1, 64, 2, 4, 1, 8, 16),     # exact multiple of the chunk
    (2, 37, 4, 3, 2, 5, 16),     # ragged length, ngroups > 1
    (1, 5, 3, 2, 3, 4, 64),      # shorter than one chunk, one group per head
    (2, 130, 8, 4, 2, 6, 32),
])
@pytest.mark.parametrize("with_docs", [False, True])
def test_ssd_matches_sequential_recurrence(b, l, h, p, g, n, chunk, with_docs):
    inp = ssd_inputs(b, l, h, p, g, n)
    D, z, dt_bias = torch.randn(h, dtype=f64), torch.randn(b, l, h, p, dtype=f64), torch.randn(h, dtype=f64)
    init = torch.randn(b, h, p, n, dtype=f64)
    seq = docs([l // 3, l - l // 3 - l // 4, l // 4], b) if with_docs and l >= 4 else None
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    init_r = init.clone().requires_grad_()
    y_ref, s_ref = ssd_ref(**leaves, D=D, z=z, dt_bias=dt_bias, initial_states=init_r,
                           seq_idx=seq, dt_softplus=True)
    (y_ref.square().sum() + s_ref.sum()).backward()

    ours = {k: v.float().clone().requires_grad_() for k, v in inp.items()}
    init_o = init.float().clone().requires_grad_()
    y, s = mamba_chunk_scan_combined(**ours, chunk_size=chunk, D=D.float(), z=z.float(),
                                     dt_bias=dt_bias.float(), initial_states=init_o, seq_idx=seq,
                                     dt_softplus=True, return_final_states=True)
    (y.square().sum() + s.sum()).backward()
    assert y.dtype == torch.float32 and y.shape == (b, l, h, p) and s.shape == (b, h, p, n)
    close(y, y_ref)
    close(s, s_ref)
    for k in inp:
        close(ours[k].grad, leaves[k].grad, rtol=1e-3)
    close(init_o.grad, init_r.grad, rtol=1e-3)


def test_ssd_chunk_size_does_not_change_results():
    inp = ssd_inputs(1, 100, 4, 4, 2, 8, dtype=torch.float32)
    dt = torch.nn.functional.softplus(inp["dt"])
    ys = [ssd_scan(inp["x"], dt, inp["A"], inp["B"], inp["C"], q)[0] for q in (8, 32, 128)]
    close(ys[0], ys[1])
    close(ys[0], ys[2])


def test_ssd_documents_do_not_leak():
    """Output for document k of a packed row equals running document k alone."""
    lengths = [7, 30, 1, 20]
    inp = ssd_inputs(1, sum(lengths), 4, 3, 2, 5, dtype=torch.float32)
    packed = mamba_chunk_scan_combined(**inp, chunk_size=16, seq_idx=docs(lengths),
                                       dt_softplus=True)
    start = 0
    for n in lengths:
        alone = mamba_chunk_scan_combined(**{k: v[:, start:start + n] if v.dim() > 1 else v
                                             for k, v in inp.items()}, chunk_size=16,
                                          dt_softplus=True)
        close(packed[:, start:start + n], alone)
        start += n


def test_ssd_dt_limit_and_gradcheck():
    inp = ssd_inputs(1, 9, 2, 2, 1, 3)
    leaves = [v.clone().requires_grad_() for v in inp.values()]

    def fn(x, dt, A, B, C):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=4, dt_softplus=True,
                                         dt_limit=(0.05, 2.0), seq_idx=docs([4, 5]))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)
    y_ref, _ = ssd_ref(*inp.values(), dt_softplus=True, dt_limit=(0.05, 2.0), seq_idx=docs([4, 5]))
    close(fn(*inp.values()), y_ref, rtol=1e-9, atol=1e-9)


def test_ssd_rejects_groups_that_do_not_divide_heads():
    inp = ssd_inputs(1, 8, 3, 2, 2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="ngroups dividing nheads=3, got \\(1, 8, 2, 4\\)"):
        mamba_chunk_scan_combined(**inp, chunk_size=4)


# ---------------------------------------------------------------- Mamba-1 scan
def scan_inputs(b, d, n, l, g=None, dtype=f64):
    bshape = (b, n, l) if g is None else (b, g, n, l)
    return dict(u=torch.randn(b, d, l, dtype=dtype), delta=torch.randn(b, d, l, dtype=dtype),
                A=-torch.rand(d, n, dtype=dtype) * 4, B=torch.randn(*bshape, dtype=dtype),
                C=torch.randn(*bshape, dtype=dtype))


def test_c_kernel_builds_here():
    assert c_kernel_available(), c_kernel_error()


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("b,d,n,l,g", [(2, 6, 4, 37, None), (1, 8, 3, 150, 2), (3, 4, 16, 1, None)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_selective_scan_matches_sequential_recurrence(use_c, b, d, n, l, g, with_docs):
    inp = scan_inputs(b, d, n, l, g)
    D, z, bias = torch.randn(d, dtype=f64), torch.randn(b, d, l, dtype=f64), torch.randn(d, dtype=f64)
    seq = docs([l // 2, l - l // 2], b) if with_docs and l > 1 else None
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y_ref, s_ref = selective_scan_ref(**leaves, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                      seq_idx=seq)
    y_ref.square().sum().backward()
    ours = {k: v.float().clone().requires_grad_() for k, v in inp.items()}
    y, s = selective_scan_torch(**ours, D=D.float(), z=z.float(), delta_bias=bias.float(),
                                delta_softplus=True, return_last_state=True, seq_idx=seq,
                                use_c_kernel=use_c)
    y.square().sum().backward()
    close(y, y_ref)
    close(s, s_ref)
    for k in inp:
        close(ours[k].grad, leaves[k].grad, rtol=1e-3)


def test_selective_scan_long_sequence_crosses_checkpoints():
    """Longer than several backward checkpoint segments of the C kernel."""
    inp = scan_inputs(1, 3, 4, 300)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    selective_scan_ref(**leaves, delta_softplus=True)[0].sum().backward()
    ours = {k: v.float().clone().requires_grad_() for k, v in inp.items()}
    selective_scan_fn(**ours, delta_softplus=True).sum().backward()
    for k in inp:
        close(ours[k].grad, leaves[k].grad, rtol=1e-3)


def test_selective_scan_gradcheck_torch_path():
    inp = scan_inputs(1, 2, 3, 6)
    leaves = [v.clone().requires_grad_() for v in inp.values()]
    seq = docs([2, 4])
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan_fn(*a, delta_softplus=True, seq_idx=seq), leaves, eps=1e-6,
        atol=1e-5)


def test_selective_scan_documents_do_not_leak():
    lengths = [5, 17, 9]
    inp = scan_inputs(2, 4, 6, sum(lengths), dtype=torch.float32)
    packed = selective_scan_fn(**inp, delta_softplus=True, seq_idx=docs(lengths, 2))
    start = 0
    for n in lengths:
        part = {k: (v[..., start:start + n] if k != "A" else v) for k, v in inp.items()}
        close(packed[..., start:start + n], selective_scan_fn(**part, delta_softplus=True))
        start += n


# ---------------------------------------------------------------- causal conv1d
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_causal_conv1d_matches_reference(width, with_docs, with_init):
    b, d, l = 2, 5, 13
    x, w, bias = torch.randn(b, d, l, dtype=f64), torch.randn(d, width, dtype=f64), torch.randn(d, dtype=f64)
    init = torch.randn(b, d, width - 1, dtype=f64) if with_init else None
    seq = docs([1, 4, 8], b) if with_docs else None
    y_ref, final_ref = causal_conv1d_ref(x, w, bias, seq_idx=seq, initial_states=init,
                                         activation="silu")
    y, final = causal_conv1d_fn(x, w, bias, seq_idx=seq, initial_states=init,
                                return_final_states=True, activation="silu")
    close(y, y_ref, rtol=1e-12, atol=1e-12)
    close(final, final_ref, rtol=0, atol=0)
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    assert torch.autograd.gradcheck(
        lambda a, c, e: causal_conv1d_fn(a, c, e, seq_idx=seq, activation="silu"), leaves)


def test_conv_update_continues_the_sequence():
    b, d, l, width = 2, 3, 9, 4
    x, w, bias = torch.randn(b, d, l), torch.randn(d, width), torch.randn(d)
    full = causal_conv1d_fn(x, w, bias, activation="silu")
    state = torch.zeros(b, d, width)
    steps = torch.stack([causal_conv1d_update(x[:, :, t], state, w, bias, "silu")
                         for t in range(l)], dim=-1)
    close(steps, full)
    close(state, x[:, :, -width:], rtol=0, atol=0)


def test_conv_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation='relu'"):
        causal_conv1d_fn(torch.randn(1, 2, 3), torch.randn(2, 4), activation="relu")


# ---------------------------------------------------------------- single-step updates
def test_state_update_continues_ssd_scan():
    b, l, h, p, g, n = 2, 11, 4, 3, 2, 5
    inp = ssd_inputs(b, l, h, p, g, n, dtype=torch.float32)
    D, dt_bias = torch.randn(h), torch.randn(h)
    y_full, s_full = mamba_chunk_scan_combined(**inp, chunk_size=4, D=D, dt_bias=dt_bias,
                                               dt_softplus=True, return_final_states=True)
    y_pre, state = mamba_chunk_scan_combined(**{k: v[:, :6] if v.dim() > 1 else v
                                                for k, v in inp.items()}, chunk_size=4, D=D,
                                             dt_bias=dt_bias, dt_softplus=True,
                                             return_final_states=True)
    for t in range(6, l):
        y_t = selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t, :, None].expand(-1, -1, p),
            inp["A"][:, None, None].expand(-1, p, n), inp["B"][:, t], inp["C"][:, t],
            D[:, None].expand(-1, p), dt_bias=dt_bias[:, None].expand(-1, p), dt_softplus=True)
        close(y_t, y_full[:, t])
    close(state, s_full)


def test_state_update_continues_selective_scan():
    b, d, n, l = 2, 6, 4, 10
    inp = scan_inputs(b, d, n, l, dtype=torch.float32)
    D, z, bias = torch.randn(d), torch.randn(b, d, l), torch.randn(d)
    y_full = selective_scan_fn(**inp, D=D, z=z, delta_bias=bias, delta_softplus=True)
    state = torch.zeros(b, d, n)
    for t in range(l):
        y_t = selective_state_update(state, inp["u"][..., t], inp["delta"][..., t], inp["A"],
                                     inp["B"][..., t], inp["C"][..., t], D, z=z[..., t],
                                     dt_bias=bias, dt_softplus=True)
        close(y_t, y_full[..., t])
    assert math.isfinite(state.abs().max().item())


def test_norms_keep_float64_in_float64() -> None:
    """float64 in, float64 arithmetic: agreement far below float32's resolution."""
    from kernels.norm import rms_norm, rms_norm_gated

    x, z, w = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    gated = x * torch.nn.functional.silu(z)
    groups = gated.view(3, 2, 4)
    expect = (groups / groups.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * w
    assert (rms_norm_gated(x, w, z, 1e-5, group_size=4) - expect).abs().max() < 1e-13
    plain = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w
    assert (rms_norm(x, w) - plain).abs().max() < 1e-13
