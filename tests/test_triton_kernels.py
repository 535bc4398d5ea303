"""Our Triton kernels (kernels/triton/) against the float64 recurrences in kernels.reference, run on
CPU by Triton's interpreter. Shapes are small (the interpreter runs each program in numpy) but
ragged: lengths, channel counts and state sizes that are multiples of no block size, documents
ending on and off block, chunk and checkpoint edges. On a GPU, MAMBA_TRITON_TEST_DEVICE=cuda runs
the same tests on the compiled kernels; bench/gpu_check.py runs them at real sizes."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton now would be too early
    pytest.skip("triton is not installed", allow_module_level=True)

# Triton 3.3 reads TRITON_INTERPRET when a @triton.jit decorator runs, its own tl.* helpers
# included, so it must be set before triton is first imported. Run alone, this file sets it
# and imports the kernels here; in a suite where something imported triton earlier (Composer
# does), test_in_fresh_process runs this file again in a new interpreter.
ON_GPU = os.environ.get("MAMBA_TRITON_TEST_DEVICE") == "cuda"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("MAMBA_TRITON_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IN_PROCESS = ON_GPU or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_in_fresh_process")
from kernels.triton import (  # noqa: E402
    causal_conv1d_triton,
    mamba_chunk_scan_combined_triton,
    selective_scan_triton,
)

if IN_PROCESS:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0" if ON_GPU else "1"
    for _name in ("_launch", "selective_scan", "conv1d", "ssd"):
        sys.modules.pop(f"kernels.triton.{_name}", None)
    from kernels.triton import _launch, conv1d  # noqa: E402, F401
    from kernels.triton import selective_scan as tscan  # noqa: E402
    from kernels.triton import ssd as tssd  # noqa: E402

    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from kernels.reference import causal_conv1d_ref, selective_scan_ref, ssd_ref  # noqa: E402

pytestmark = pytest.mark.timeout(600)
f64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def rows(*docs_per_row):
    """seq_idx [b, l]: one list of document lengths per row."""
    return torch.stack([torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
                        for lengths in docs_per_row]).to(DEVICE)


def close(a, b, rtol, atol, what=""):
    scale = b.abs().max().clamp(min=1.0)
    err = (a.double() - b.double()).abs().max()
    assert err <= atol + rtol * scale, f"{what}: max diff {err:.3g} (scale {scale:.3g})"


@interpreted
def test_kernels_were_built_for_the_interpreter():
    assert _launch.interpreting() != ON_GPU
    assert (type(tscan._scan_fwd.fn).__name__ == "InterpretedFunction") != ON_GPU


# ---------------------------------------------------------------- Mamba-1 selective scan
# (b, d, n, l, groups or None for [b,n,l] B/C, seq_idx rows or None, options)
SCAN_CASES = {
    "shared-BC-all-options": (2, 6, 5, 37, None, None, dict(D=True, z=True, bias=True, softplus=True)),
    "3-docs-off-edges-g2": (2, 6, 4, 37, 2, rows([10, 16, 11], [5, 20, 12]), dict(D=True)),
    "docs-on-ckpt-edges-g1": (2, 5, 3, 40, 1, rows([16, 16, 8], [40]), dict(z=True, bias=True)),
    "1-doc-z-softplus": (2, 4, 4, 21, 2, rows([21], [21]), dict(z=True, softplus=True, bias=True)),
    "shorter-than-K": (2, 3, 2, 5, 1, rows([2, 3], [1, 4]), dict(D=True, z=True)),
}


def scan_inputs(b, d, n, length, groups, opts, dtype=f64):
    g = torch.Generator().manual_seed(1)
    shape_bc = (b, n, length) if groups is None else (b, groups, n, length)
    t = dict(u=torch.randn(b, d, length, generator=g),
             delta=torch.randn(b, d, length, generator=g) * 0.5 + (0.0 if opts.get("softplus") else 1.0),
             A=-torch.rand(d, n, generator=g) * 2 - 0.2, B=torch.randn(*shape_bc, generator=g),
             C=torch.randn(*shape_bc, generator=g))
    if not opts.get("softplus"):
        t["delta"] = t["delta"].abs() * 0.5
    if opts.get("D"):
        t["D"] = torch.randn(d, generator=g)
    if opts.get("z"):
        t["z"] = torch.randn(b, d, length, generator=g)
    if opts.get("bias"):
        t["delta_bias"] = torch.rand(d, generator=g) * 0.5
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}


def run_scan(fn, t, seq, softplus, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}
    y, last = fn(**leaves, delta_softplus=softplus, seq_idx=seq, **({} if fn is selective_scan_ref else
                                                                   dict(return_last_state=True)))
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + last.double().square().sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


@interpreted
@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_forward_backward_match_float64(case, monkeypatch):
    b, d, n, length, groups, seq, opts = SCAN_CASES[case]
    monkeypatch.setattr(tscan, "CHECKPOINT_EVERY", 16)  # several checkpoint segments at these lengths
    t = scan_inputs(b, d, n, length, groups, opts)
    y_ref, s_ref, g_ref = run_scan(selective_scan_ref, t, seq, opts.get("softplus", False), f64)
    y, s, grads = run_scan(selective_scan_triton, t, seq, opts.get("softplus", False), torch.float32)
    assert y.dtype == torch.float32 and y.shape == (b, d, length) and s.shape == (b, d, n)
    close(y, y_ref, 2e-5, 2e-5, "y")
    close(s, s_ref, 2e-5, 2e-5, "last state")
    for k in t:
        assert grads[k].shape == t[k].shape
        close(grads[k], g_ref[k], 1e-4, 2e-5, f"d{k}")


@interpreted
def test_selective_scan_resets_matter_and_one_document_equals_none():
    t = scan_inputs(2, 4, 3, 20, 1, {"D": True})
    seq = rows([7, 13], [20])
    y_docs = selective_scan_triton(**{k: v.float() for k, v in t.items()}, seq_idx=seq)
    y_none = selective_scan_triton(**{k: v.float() for k, v in t.items()})
    close(y_docs[1], y_none[1], 1e-6, 1e-6, "row of one document")
    assert (y_docs[0, :, 7:] - y_none[0, :, 7:]).abs().max() > 1e-3  # the reset changed the 2nd document


@interpreted
def test_selective_scan_constant_B_C_and_cu_seqlens(monkeypatch):
    monkeypatch.setattr(tscan, "CHECKPOINT_EVERY", 16)
    t = scan_inputs(1, 3, 2, 21, 1, {"D": True, "z": True})
    gen = torch.Generator().manual_seed(4)
    t["B"] = torch.randn(3, 2, generator=gen, dtype=f64).to(DEVICE)  # [d, n]: the same at every position
    seq = rows([6, 15])
    y_ref, s_ref, g_ref = run_scan(selective_scan_ref, t, seq, False, f64)
    leaves = {k: v.detach().float().requires_grad_() for k, v in t.items()}
    y, s = selective_scan_triton(**leaves, cu_seqlens=torch.tensor([0, 6, 21], device=DEVICE),
                              return_last_state=True)
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + s.double().square().sum()).backward()
    close(y, y_ref, 2e-5, 2e-5, "y")
    close(s, s_ref, 2e-5, 2e-5, "last state")
    for k in t:
        close(leaves[k].grad, g_ref[k], 1e-4, 2e-5, f"d{k}")


@interpreted
def test_selective_scan_bfloat16_inputs_accumulate_in_float32():
    b, d, n, length, groups, seq, opts = SCAN_CASES["3-docs-off-edges-g2"]
    t = scan_inputs(b, d, n, length, groups, dict(opts, z=True))
    t = {k: v.to(torch.bfloat16).to(f64) for k, v in t.items()}  # the reference sees the same rounded inputs
    y_ref, s_ref, g_ref = run_scan(selective_scan_ref, t, seq, False, f64)
    leaves = {k: v.to(torch.bfloat16).requires_grad_() if k != "A" else v.float().requires_grad_()
              for k, v in t.items()}
    y, s = selective_scan_triton(**leaves, seq_idx=seq, return_last_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    close(y, y_ref, 1e-2, 1e-2, "y")  # one bf16 rounding of the output
    close(s, s_ref, 1e-5, 1e-5, "last state")  # float32 all the way
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + s.double().square().sum()).backward()
    for k in ("u", "delta", "B", "C", "A", "D"):
        assert leaves[k].grad.dtype == leaves[k].dtype
        close(leaves[k].grad, g_ref[k], 2e-2, 2e-2, f"d{k}")


@interpreted
def test_selective_scan_rejects_bad_input_in_one_line():
    t = {k: v.float() for k, v in scan_inputs(1, 4, 3, 8, 2, {}).items()}
    with pytest.raises(TypeError, match="float64"):
        selective_scan_triton(**dict(t, u=t["u"].double()))
    with pytest.raises(ValueError, match="must be"):
        selective_scan_triton(**dict(t, B=t["B"][:, :, :, :5]))
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan_triton(**{k: v.to("meta") for k, v in t.items()})
    with pytest.raises(ValueError, match="D must have shape"):
        selective_scan_triton(**t, D=torch.ones(5))


# ---------------------------------------------------------------- causal conv1d
# (b, d, l, w, channel_last, seq_idx rows or None, bias, initial states, activation)
CONV_CASES = {
    "docs-on-and-off-block-edges": (2, 6, 37, 4, False, rows([16, 3, 18], [37]), True, True, "silu"),
    "channel-last-3-docs": (2, 6, 37, 4, True, rows([5, 11, 21], [20, 17]), False, True, None),
    "no-docs-width-2": (2, 5, 21, 2, False, None, True, False, "silu"),
    "channel-last-width-3-no-init": (2, 3, 19, 3, True, rows([19], [4, 15]), True, False, "silu"),
    "shorter-than-window": (2, 4, 2, 4, False, rows([1, 1], [2]), True, True, None),
    "padding-positions": (2, 5, 23, 4, True, rows([15, 8], [23]) - 2 * rows([15, 8], [23]).eq(1), True, True,
                          "silu"),  # row 0: document 0, then 8 padding positions (seq_idx -1)
}


def conv_inputs(b, d, length, width, bias, init, dtype=f64):
    g = torch.Generator().manual_seed(2)
    t = dict(x=torch.randn(b, d, length, generator=g), weight=torch.randn(d, width, generator=g))
    if bias:
        t["bias"] = torch.randn(d, generator=g)
    if init:
        t["initial_states"] = torch.randn(b, d, width - 1, generator=g)
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}


def run_conv(fn, t, seq, act, dtype, channel_last=False):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}
    x = leaves["x"]
    if channel_last:  # a [b,l,d] tensor seen as [b,d,l], as the Mamba mixers hand it over
        leaves["x"] = x = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    args = {k: v for k, v in leaves.items() if k != "x"}
    if fn is causal_conv1d_ref:
        y, final = fn(x, seq_idx=seq, activation=act, **args)
    else:
        y, final = fn(x, seq_idx=seq, activation=act, return_final_states=True, **args)
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + final.double().square().sum()).backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


@interpreted
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_causal_conv1d_forward_backward_match_float64(case):
    b, d, length, width, channel_last, seq, bias, init, act = CONV_CASES[case]
    t = conv_inputs(b, d, length, width, bias, init)
    y_ref, f_ref, g_ref = run_conv(causal_conv1d_ref, t, seq, act, f64)
    y, final, grads = run_conv(causal_conv1d_triton, t, seq, act, torch.float32, channel_last)
    assert y.shape == (b, d, length) and final.shape == (b, d, width - 1)
    if channel_last:
        assert y.stride(1) == 1  # the output keeps the input's layout
    close(y, y_ref, 2e-6, 2e-6, "y")
    close(final, f_ref, 0, 1e-7, "final states")
    for k in t:
        close(grads[k], g_ref[k], 1e-5, 1e-5, f"d{k}")


@interpreted
def test_causal_conv1d_bfloat16_and_errors():
    b, d, length, width, _, seq, bias, init, act = CONV_CASES["docs-on-and-off-block-edges"]
    t = {k: v.to(torch.bfloat16).to(f64) for k, v in conv_inputs(b, d, length, width, bias, init).items()}
    y_ref, f_ref, g_ref = run_conv(causal_conv1d_ref, t, seq, act, f64)
    y, final, grads = run_conv(causal_conv1d_triton, t, seq, act, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and grads["weight"].dtype == torch.bfloat16
    close(y, y_ref, 1e-2, 1e-2, "y")
    close(final, f_ref, 0, 0, "final states")
    for k in t:
        close(grads[k], g_ref[k], 2e-2, 2e-2, f"d{k}")
    x, w = t["x"].float(), t["weight"].float()
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(x, w, activation="relu")
    with pytest.raises(TypeError, match="float64"):
        causal_conv1d_triton(x.double(), w)
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_triton(x, w, initial_states=x[:, :, :2])


# ---------------------------------------------------------------- Mamba-2 SSD
# (b, l, h, p, g, n, seq_idx rows or None, options); chunks of 16 positions here
SSD_CASES = {
    "3-docs-g2-init-D-z": (2, 37, 4, 3, 2, 5, rows([10, 16, 11], [37]), dict(init=True, D=(4,), z=True)),
    "docs-on-chunk-edges-g1": (2, 48, 2, 4, 1, 3, rows([16, 16, 16], [1, 47]), dict(init=True)),
    "no-docs-D-per-channel-dt-limit": (2, 20, 3, 2, 3, 17, None, dict(D=(3, 2), dt_limit=(0.05, 2.0))),
}


def ssd_inputs(b, length, h, p, g, n, opts, dtype=f64):
    gen = torch.Generator().manual_seed(3)
    t = dict(x=torch.randn(b, length, h, p, generator=gen), dt=torch.randn(b, length, h, generator=gen),
             A=-torch.rand(h, generator=gen) * 2 - 0.1, B=torch.randn(b, length, g, n, generator=gen),
             C=torch.randn(b, length, g, n, generator=gen), dt_bias=torch.randn(h, generator=gen) * 0.3)
    if opts.get("D"):
        t["D"] = torch.randn(*opts["D"], generator=gen)
    if opts.get("z"):
        t["z"] = torch.randn(b, length, h, p, generator=gen)
    if opts.get("init"):
        t["initial_states"] = torch.randn(b, h, p, n, generator=gen)
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}


def run_ssd(fn, t, seq, dt_limit, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}
    if fn is ssd_ref:
        y, state = fn(**leaves, seq_idx=seq, dt_softplus=True, dt_limit=dt_limit)
    else:
        y, state = fn(**leaves, chunk_size=256, seq_idx=seq, dt_softplus=True, dt_limit=dt_limit,
                      return_final_states=True)
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + state.double().square().sum()).backward()
    return y, state, {k: v.grad for k, v in leaves.items()}


@interpreted
@pytest.mark.parametrize("case", list(SSD_CASES))
def test_ssd_forward_backward_match_float64(case, monkeypatch):
    b, length, h, p, g, n, seq, opts = SSD_CASES[case]
    monkeypatch.setattr(tssd, "CHUNK", 16)  # several chunks, documents across their edges
    limit = opts.get("dt_limit", (0.0, float("inf")))
    t = ssd_inputs(b, length, h, p, g, n, opts)
    y_ref, s_ref, g_ref = run_ssd(ssd_ref, t, seq, limit, f64)
    y, s, grads = run_ssd(mamba_chunk_scan_combined_triton, t, seq, limit, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (b, length, h, p) and s.shape == (b, h, p, n)
    close(y, y_ref, 2e-5, 2e-5, "y")
    close(s, s_ref, 2e-5, 2e-5, "final state")
    for k in t:
        close(grads[k], g_ref[k], 1e-4, 2e-5, f"d{k}")


@interpreted
def test_ssd_bfloat16_cu_seqlens_and_errors(monkeypatch):
    monkeypatch.setattr(tssd, "CHUNK", 16)
    b, length, h, p, g, n, seq, opts = SSD_CASES["3-docs-g2-init-D-z"]
    t = {k: v.to(torch.bfloat16).to(f64) for k, v in ssd_inputs(1, length, h, p, g, n, opts).items()}
    y_ref, s_ref, g_ref = run_ssd(ssd_ref, t, seq[:1], (0.0, float("inf")), f64)
    leaves = {k: v.to(torch.bfloat16).requires_grad_() for k, v in t.items()}
    cu = torch.tensor([0, 10, 26, 37], device=DEVICE)  # the same three documents, as packed sequences
    y, s = mamba_chunk_scan_combined_triton(**leaves, chunk_size=64, cu_seqlens=cu, dt_softplus=True,
                                            return_final_states=True)
    assert y.dtype == torch.bfloat16
    close(y, y_ref, 2e-2, 2e-2, "y")
    close(s, s_ref, 1e-2, 1e-2, "final state")
    w = torch.linspace(-1, 1, y.numel(), dtype=f64, device=y.device).view_as(y)
    ((y.double() * w).sum() + s.double().square().sum()).backward()
    for k in t:
        close(leaves[k].grad, g_ref[k], 3e-2, 3e-2, f"d{k}")
    x = t["x"].float()
    with pytest.raises(ValueError, match="torch path"):
        mamba_chunk_scan_combined_triton(**{k: v.float() for k, v in t.items()}, chunk_size=64, cu_seqlens=cu,
                                         return_varlen_states=True)
    with pytest.raises(ValueError, match="ngroups"):
        mamba_chunk_scan_combined_triton(x, t["dt"].float(), t["A"].float(), t["B"].float()[:, :, :1].expand(
            -1, -1, 3, -1), t["C"].float()[:, :, :1].expand(-1, -1, 3, -1), chunk_size=64)


# ---------------------------------------------------------------- import without a GPU or triton
@interpreted
def test_import_needs_no_driver_and_no_triton():
    script = (
        "import sys, kernels.triton as kt\n"
        "assert 'triton' not in sys.modules and kt.available()\n"
        "import kernels.triton.selective_scan, kernels.triton.conv1d\n"  # autotune without a driver
        "for m in [m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'kernels.triton'))]:\n"
        "    del sys.modules[m]\n"
        "sys.modules['triton'] = None\n"  # as if triton were not installed
        "import kernels.triton as kt\n"
        "assert not kt.available()\n"
        "try:\n    kt.selective_scan_triton(*[None] * 5)\nexcept ImportError as e:\n    print('OK', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OK the Triton kernels need the triton package")


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", __file__], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed, 1 skipped in " in out.stdout, out.stdout[-2000:]  # only this test skips there


@interpreted
def test_gpu_check_refuses_bad_arguments_and_a_missing_gpu():
    script = str(ROOT / "bench" / "gpu_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script, "--seq-len", "0"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "--seq-len must be at least 1, got 0" in out.stderr
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "--interpret-smoke" in out.stderr


@interpreted
def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """The interpreter accepts Python the Triton compiler rejects: compile each kernel for sm_90 too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    out = subprocess.run([sys.executable, "-m", "kernels.triton.compile_check", "--quick", "--arch", "90"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 11 and all(ln.startswith("sm_90 ") for ln in lines), out.stdout
    # The scan and conv kernels fit in registers (the SSD's tiles at headdim 64 x dstate 128 do not yet).
    assert all("0 bytes spill stores" in ln for ln in lines if "_ssd_" not in ln), out.stdout


@interpreted
def test_usable_only_for_cuda_tensors_of_supported_dtypes():
    from kernels.triton import usable

    x = torch.zeros(2, 3)
    assert not usable(x, None)  # CPU tensors go to the torch / C paths
    assert not usable()
    meta = torch.zeros(2, 3, device="meta")
    assert not usable(meta)
    assert usable(x.to(DEVICE), x.to(DEVICE, torch.bfloat16)) == ON_GPU
    assert not usable(x.to(DEVICE, torch.float64))


@interpreted
def test_empty_sequences():
    t = {k: v.float() for k, v in scan_inputs(2, 4, 3, 0, 1, {"D": True}).items()}
    y, last = selective_scan_triton(**t, return_last_state=True)
    assert y.shape == (2, 4, 0) and torch.equal(last.cpu(), torch.zeros(2, 4, 3))
    x, w = torch.zeros(2, 3, 0, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    init = torch.randn(2, 3, 3, device=DEVICE)
    y, final = causal_conv1d_triton(x, w, initial_states=init, return_final_states=True)
    assert y.shape == (2, 3, 0) and torch.equal(final, init)
