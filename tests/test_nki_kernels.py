"""NKI kernels run unmodified on the NumPy executor of the NKI subset, against the float64
references in kernels/reference.py; and the executor's own limits."""

from __future__ import annotations

import pytest
import torch
from nki_helpers import close, close_bf16, conv_case, docs, ssd_inputs, ssd_reference

from kernels.nki import executor
from kernels.reference import causal_conv1d_ref

pytestmark = pytest.mark.skipif(
    executor.real_neuronxcc_present() and not executor.installed(),
    reason="a real neuronxcc is installed; these tests run the kernels on the NumPy executor")


@pytest.fixture(scope="module")
def nki():
    executor.install()
    import neuronxcc.nki as nki_module

    from kernels.nki import autograd

    yield nki_module, autograd
    executor.uninstall()


# --- causal conv1d ----------------------------------------------------------------------------
@pytest.mark.parametrize("width,bias,silu,starts,length", [
    (4, True, True, [[100, 128, 131], [256, 300]], 384),  # boundaries inside and on 128-token edges
    (3, False, False, [[128], [5, 200, 383]], 256),
    (2, True, True, None, 512),  # 256-token time tiles
    (4, True, True, [[60], [128]], 256),  # with padding (seq_idx -1) at the rows' ends
])
def test_causal_conv1d_matches_reference(nki, width, bias, silu, starts, length):
    _, autograd = nki
    seq = docs(2, length, starts) if starts else None
    if starts == [[60], [128]]:
        seq[0, 200:] = -1
        seq[1, 126:128] = -1  # two padding tokens just before a tile edge, then a new document
    y_ref, grads_ref, ours, dy, act = conv_case(2, 160, length, width, bias, seq, silu)
    y = autograd.causal_conv1d_nki(ours[0], ours[1], ours[2] if bias else None, seq_idx=seq, activation=act)
    close(y, y_ref, 1e-5, "y")
    grads = torch.autograd.grad(y, ours, dy.float())
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=False):
        close(g, g_ref, 2e-5, name)


def test_causal_conv1d_dx_crosses_tile_edges(nki):
    """dx[t] takes gradients from outputs t+1..t+w-1, which for the last w-1 tokens of a
    128-token tile live in the next tile. Dropping them (the public kernel) is visibly wrong."""
    _, autograd = nki
    length, width = 384, 4
    y_ref, grads_ref, ours, dy, act = conv_case(1, 128, length, width, True, None, True)
    y = autograd.causal_conv1d_nki(*ours, activation=act)
    dx = torch.autograd.grad(y, ours[0], dy.float())[0]
    edges = torch.cat([torch.arange(e - width + 1, e) for e in range(128, length, 128)])
    close(dx[..., edges], grads_ref[0][..., edges], 2e-5, "dx at tile edges")

    # what a per-tile backward gives: the gradient of each tile's outputs only, per tile
    x = ours[0].detach().double().requires_grad_()
    y64, _ = causal_conv1d_ref(x, ours[1].detach().double(), ours[2].detach().double(), activation="silu")
    full = torch.autograd.grad(y64, x, dy, retain_graph=True)[0]
    tile_of = torch.arange(length) // 128
    per_tile = torch.zeros_like(x)
    for tile in range(length // 128):
        mask = (tile_of == tile).double()
        g = torch.autograd.grad(y64, x, dy * mask, retain_graph=True)[0]
        per_tile += g * mask
    dropped = (per_tile - full).abs()[..., edges].max().item()
    assert dropped > 1e-2, dropped  # the cross-tile terms matter on exactly these tokens
    inside = torch.ones(length, dtype=torch.bool)
    inside[edges] = False
    assert (per_tile - full).abs()[..., inside].max().item() < 1e-12


def test_causal_conv1d_bf16(nki):
    _, autograd = nki
    seq = docs(2, 256, [[128], [64]])
    y_ref, grads_ref, ours, dy, act = conv_case(2, 64, 256, 4, True, seq, True, torch.bfloat16)
    y = autograd.causal_conv1d_nki(*ours, seq_idx=seq, activation=act)
    assert y.dtype == torch.bfloat16
    close(y, y_ref, 3e-2, "y bf16")
    dx = torch.autograd.grad(y, ours[0], dy.to(torch.bfloat16))[0]
    assert dx.dtype == torch.bfloat16
    close(dx, grads_ref[0], 5e-2, "dx bf16")


@pytest.mark.parametrize("dim,width,bias,silu,starts,length", [
    (160, 4, True, True, [[100, 128, 131], [256, 300]], 384),  # boundaries inside and on tile edges
    (64, 2, False, False, [[128], [5, 400]], 512),  # 256-token time tiles
])
def test_causal_conv1d_bf16_is_one_rounding_from_float64(nki, dim, width, bias, silu, starts, length):
    """bf16 x, weight, bias and dy: against the float64 reference on the same bf16 values, y and
    every gradient are within one bf16 rounding (the kernel widens to fp32 on load, rounds on store)."""
    _, autograd = nki
    seq = docs(2, length, starts)
    x, w = torch.randn(2, dim, length).bfloat16(), torch.randn(dim, width).bfloat16()
    b = torch.randn(dim).bfloat16() if bias else None
    dy = torch.randn(2, dim, length).bfloat16()
    leaves = [t for t in (x, w, b) if t is not None]
    ref = [t.double().requires_grad_() for t in leaves]
    act = "silu" if silu else None
    y_ref, _ = causal_conv1d_ref(ref[0], ref[1], ref[2] if bias else None, seq_idx=seq, activation=act)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    ours = [t.clone().requires_grad_() for t in leaves]
    y = autograd.causal_conv1d_nki(ours[0], ours[1], ours[2] if bias else None, seq_idx=seq, activation=act)
    close_bf16(y, y_ref, "y")
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, ours, dy), grads_ref,
                              strict=False):
        close_bf16(g, g_ref, name)


def test_nki_wrappers_refuse_bad_lengths_and_widths(nki):
    _, autograd = nki
    with pytest.raises(ValueError, match="length 200 is not a multiple of 128"):
        autograd.causal_conv1d_nki(torch.randn(1, 8, 200), torch.randn(8, 4))
    with pytest.raises(ValueError, match="conv width 5"):
        autograd.causal_conv1d_nki(torch.randn(1, 8, 128), torch.randn(8, 5))


# --- Mamba-2 SSD ------------------------------------------------------------------------------
@pytest.mark.parametrize("length,ngroups,d_per_channel,starts", [
    (256, 1, False, [[100, 128], [128]]),  # three docs (one start on the chunk edge), two docs
    (256, 2, True, [[1, 255], [127, 129]]),  # starts next to chunk edges
    (384, 2, False, [[200], []]),  # a start in the middle chunk: the old state must not reach chunk 3
])
def test_ssd_matches_reference(nki, length, ngroups, d_per_channel, starts):
    _, autograd = nki
    leaves = ssd_inputs(2, length, 4, 16, ngroups, 8, d_per_channel)
    seq = docs(2, length, starts) if starts else None
    y_ref = ssd_reference(*leaves, seq)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    ours = [t.detach().float().requires_grad_() for t in leaves]
    y = autograd.mamba_chunk_scan_nki(*ours[:5], D=ours[5], seq_idx=seq)
    close(y, y_ref, 1e-5, "y")
    with torch.no_grad():  # the forward without the per-chunk states for the backward
        assert torch.equal(autograd.mamba_chunk_scan_nki(*ours[:5], D=ours[5], seq_idx=seq), y)
    grads = torch.autograd.grad(y, ours, dy.float())
    for name, g, g_ref in zip(("dx", "ddt", "dA", "dB", "dC", "dD"), grads, grads_ref, strict=True):
        close(g, g_ref, 2e-5, name)


def test_ssd_full_tiles_gate_and_dt_processing(nki):
    """headdim 128 and d_state 128 (a whole partition axis each), z gate, dt_bias + softplus."""
    _, autograd = nki
    x, dt, A, B, C, D = ssd_inputs(1, 128, 2, 128, 1, 128, False)
    z = torch.randn_like(x).requires_grad_()
    dt_bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    dt_raw = (dt.detach() - 0.3).requires_grad_()
    seq = docs(1, 128, [[64]])
    leaves = [x, dt_raw, A, B, C, D, z, dt_bias]
    y_ref = ssd_reference(x, dt_raw, A, B, C, D, seq, z=z, dt_bias=dt_bias, dt_softplus=True)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    ours = [t.detach().float().requires_grad_() for t in leaves]
    y = autograd.mamba_chunk_scan_nki(*ours[:5], D=ours[5], z=ours[6], dt_bias=ours[7], seq_idx=seq,
                                      dt_softplus=True)
    close(y, y_ref, 1e-5, "y")
    grads = torch.autograd.grad(y, ours, dy.float())
    for name, g, g_ref in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias"), grads, grads_ref,
                              strict=True):
        close(g, g_ref, 5e-5, name)


def test_ssd_bf16_inputs(nki):
    _, autograd = nki
    leaves = ssd_inputs(2, 256, 2, 32, 1, 16, False)
    seq = None
    y_ref = ssd_reference(*leaves, seq)
    dy = torch.randn_like(y_ref)
    dx_ref = torch.autograd.grad(y_ref, leaves[0], dy)[0]
    ours = [t.detach().to(torch.bfloat16 if i in (0, 3, 4) else torch.float32).requires_grad_()
            for i, t in enumerate(leaves)]
    y = autograd.mamba_chunk_scan_nki(*ours[:5], D=ours[5], seq_idx=seq)
    assert y.dtype == torch.bfloat16
    close(y, y_ref, 3e-2, "y bf16")
    dx = torch.autograd.grad(y, ours[0], dy.to(torch.bfloat16))[0]
    assert dx.dtype == torch.bfloat16
    close(dx, dx_ref, 3e-2, "dx bf16")


@pytest.mark.parametrize("ngroups,starts", [(2, [[1, 127, 128, 200], [129]]), (1, None)])
def test_ssd_bf16_is_one_rounding_from_float64(nki, ngroups, starts):
    """bf16 x, B, C and dy (dt, A, D fp32), documents across chunk edges: against the float64
    reference on the same values, the bf16 outputs (y, dx, dB, dC) are within one bf16 rounding
    and the fp32 ones (ddt, dA, dD) as close as in fp32."""
    _, autograd = nki
    leaves = ssd_inputs(2, 256, 4, 16, ngroups, 16, False)
    ours = [t.detach().to(torch.bfloat16 if i in (0, 3, 4) else torch.float32).requires_grad_()
            for i, t in enumerate(leaves)]
    ref = [t.detach().double().requires_grad_() for t in ours]
    seq = docs(2, 256, starts) if starts else None
    y_ref = ssd_reference(*ref, seq)
    dy = torch.randn_like(y_ref).bfloat16()
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    y = autograd.mamba_chunk_scan_nki(*ours[:5], D=ours[5], seq_idx=seq)
    close_bf16(y, y_ref, "y")
    grads = torch.autograd.grad(y, ours, dy)
    for name, g, g_ref in zip(("dx", "ddt", "dA", "dB", "dC", "dD"), grads, grads_ref, strict=True):
        if g.dtype == torch.bfloat16:
            close_bf16(g, g_ref, name)
        else:
            close(g, g_ref, 2e-5, name)


def test_ssd_refuses_unsupported_shapes(nki):
    _, autograd = nki
    x, dt, A, B, C, _ = (t.detach().float() for t in ssd_inputs(1, 128, 2, 16, 1, 8, False))
    with pytest.raises(ValueError, match="length 100 is not a multiple of 128"):
        autograd.mamba_chunk_scan_nki(x[:, :100], dt[:, :100], A, B[:, :100], C[:, :100])
    with pytest.raises(ValueError, match="headdim 130"):
        autograd.mamba_chunk_scan_nki(torch.zeros(1, 128, 2, 130), dt, A, B, C)


def test_work_counters_match_the_kernels_matmuls(nki):
    """The executor's counters (what kernels/nki/work.py reports) against a hand count of every
    nc_matmul the SSD forward issues per chunk: per head and per group."""
    from kernels.nki import work

    heads, p, groups, n, q = 4, 16, 2, 8, 128
    per_head = 2 * q * q + 2 * q * q + 2 * q * q + 2 * q * p + 2 * q * q * p + 2 * n * q * p + 2 * q * n * p
    per_group = 2 * n * q * q + 2 * q * q + 2 * q * q + 2 * q * q  # C.B^T, start counts, their rows, total
    counts = work.ssd_work(heads, p, groups, n, nchunks=2)
    assert counts["fwd"]["matmul_flops"] == per_head + per_group * groups / heads
    assert counts["bwd"]["matmul_flops"] > 2 * counts["fwd"]["matmul_flops"]
    conv = work.conv_work(channels=256, width=4, ntiles=2)
    assert conv["fwd"]["dma_bytes"] > 2 * 2 * q * q  # bf16 x in and y out at least


def test_nki_enabled_only_for_the_real_compiler_on_xla(nki):
    import sys
    import types

    from kernels.nki import nki_available, nki_enabled

    assert not nki_available()  # the executor is installed: it is not a compiler
    assert not nki_enabled(torch.device("cpu"))
    stand_in = types.ModuleType("neuronxcc")  # what neuron/runtime.py registers without the SDK
    stand_in.__path__ = []
    executor.uninstall()
    try:
        sys.modules["neuronxcc"] = stand_in
        assert not nki_available()
        executor.install()  # sets the stand-in aside ...
        assert executor.installed() and not nki_available()
        executor.uninstall()  # ... and puts it back
        assert sys.modules["neuronxcc"] is stand_in
    finally:
        sys.modules.pop("neuronxcc", None)
        executor.install()


def test_mamba2_mixer_on_the_nki_kernels_matches_the_torch_path(nki, monkeypatch):
    """The model's own calls (views, D per head, dt_limit, seq_idx, the grouped gated norm under
    activation checkpointing) through the dispatch-shaped entry points: output and every
    parameter gradient as on the torch path."""
    _, autograd = nki
    import mamba.model.mamba2 as mamba2

    torch.manual_seed(3)
    mixer = mamba2.Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, dt_limit=(0.0, 0.5))
    hidden = torch.randn(2, 256, 64)
    seq = docs(2, 256, [[90, 128], [200]])

    def run():
        mixer.zero_grad()
        out = mixer(hidden, seq_idx=seq)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}

    out_ref, grads_ref = run()
    monkeypatch.setattr(mamba2, "causal_conv1d_fn", autograd.causal_conv1d_fn_nki)
    monkeypatch.setattr(mamba2, "mamba_chunk_scan_combined", autograd.mamba_chunk_scan_combined_nki)
    monkeypatch.setattr(mamba2, "rms_norm_gated", autograd.rms_norm_gated_nki)
    executor.counters.reset()
    out, grads = run()
    assert executor.counters.matmul_flops > 0  # the kernels ran
    close(out, out_ref, 2e-5, "mixer output")
    for name, g in grads.items():
        close(g, grads_ref[name], 1e-4, f"grad of {name}")


@pytest.mark.parametrize("dim,group_size,gated,before", [
    (640, 320, True, False),  # Mamba-2's choice, two groups
    (5120, None, True, False),  # Mamba-2 2.7B's one group of 5,120: ten pieces, fits the SBUF
    (192, None, True, True),
    (192, 64, False, False),
])
def test_gated_rms_norm_matches_torch_float64(nki, dim, group_size, gated, before):
    _, autograd = nki
    from kernels.norm import rms_norm_gated

    x = torch.randn(2, 128, dim, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 128, dim, dtype=torch.float64, requires_grad=True) if gated else None
    w = (torch.rand(dim, dtype=torch.float64) + 0.5).requires_grad_()
    leaves = [t for t in (x, z, w) if t is not None]
    y_ref = rms_norm_gated(x, w, z, 1e-5, group_size, before)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    ours = [t.detach().float().requires_grad_() for t in leaves]
    xo, zo, wo = ours[0], ours[1] if gated else None, ours[-1]
    y = autograd.rms_norm_gated_nki(xo, wo, zo, 1e-5, group_size, before)
    close(y, y_ref, 1e-5, "y")
    for name, g, g_ref in zip(("dx", "dz", "dw") if gated else ("dx", "dw"),
                              torch.autograd.grad(y, ours, dy.float()), grads_ref, strict=True):
        close(g, g_ref, 2e-5, name)
    with pytest.raises(ValueError, match="100 rows"):
        autograd.rms_norm_gated_nki(torch.randn(100, dim), torch.ones(dim))
