"""The compiled decode kernels (kernels/decode.py) against float64 torch compositions.

The float64 runs go through kernels.dispatch's torch branch (the C path takes float32 only),
which composes the conv update, the state update and the gated norm that test_kernels checks
against sequential recurrences.
"""

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import add_rms_norm, decode, linear, mamba2_block_step, mamba2_step

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64

pytestmark = pytest.mark.skipif(not decode.available(), reason="no C compiler for the decode kernels")


def close(a, b, tol=2e-5):
    scale = b.abs().max().clamp(min=1.0)
    err = (a.double() - b.double()).abs().max()
    assert err <= tol * scale, f"max diff {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("rows,out,inp,bias", [
    (1, 3352, 768, False),    # big enough for the worker threads
    (3, 1000, 257, True),     # odd sizes, part-rows
    (4, 50, 24, True),        # tiny: the caller's thread alone
])
def test_linear_matches_float64(rows, out, inp, bias):
    x, w = torch.randn(rows, inp), torch.randn(out, inp)
    b = torch.randn(out) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = decode.linear(x, w, b)
    close(y, ref)
    close(linear(x[:, None, :], w, b)[:, 0], ref)  # through the dispatch, 3-d input
    close(decode.linear(x.t().contiguous().t(), w, b), ref)  # non-contiguous x


def test_linear_dispatch_keeps_autograd_and_large_batches_on_torch():
    x, w = torch.randn(2, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    linear(x, w).square().sum().backward()
    close(w.grad, (2 * F.linear(x, w).t() @ x).detach())
    big = torch.randn(decode.DECODE_MAX_ROWS + 1, 16)
    close(linear(big, w.detach()), F.linear(big.double(), w.detach().double()))


def test_linear_is_safe_from_two_threads_at_once():
    w = torch.randn(4096, 512)
    xs = [torch.randn(1, 512) for _ in range(8)]
    results = [None] * len(xs)

    def work(i):
        for _ in range(20):
            results[i] = decode.linear(xs[i], w)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(xs, results, strict=True):
        close(y, F.linear(x.double(), w.double()))


def test_worker_threads_are_rebuilt_after_fork():
    code = """
import os, torch
from kernels import decode
w, x = torch.randn(4096, 512), torch.randn(1, 512)
ref = decode.linear(x, w)  # starts the workers
pid = os.fork()
if pid == 0:
    ok = torch.allclose(decode.linear(x, w), ref)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "0", result.stderr


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_float64(with_residual):
    h, w = torch.randn(3, 96), torch.rand(96) + 0.5
    r = torch.randn(3, 96) if with_residual else None
    normed, res = add_rms_norm(h, r, w, 1e-5)
    ref_n, ref_r = add_rms_norm(h.double(), None if r is None else r.double(), w.double(), 1e-5)
    close(res, ref_r)
    close(normed, ref_n)


CASES = [  # (ngroups, D per channel, gated norm, norm before gate, dt_limit, conv bias)
    (1, False, True, False, (0.0, math.inf), True),   # Mamba-2's defaults
    (2, True, True, True, (0.0, math.inf), False),
    (4, False, False, False, (0.01, 0.2), True),      # no norm: y * silu(z); clamped dt
]


def step_inputs(batch, ngroups, d_per_channel, gated, with_bias, nheads=8, headdim=4, dstate=6, width=4):
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * dstate
    return dict(
        conv_state=torch.randn(batch, conv_dim, width),
        ssm_state=torch.randn(batch, nheads, headdim, dstate),
        conv_weight=torch.randn(conv_dim, width) * 0.5,
        conv_bias=torch.randn(conv_dim) if with_bias else None,
        A=-torch.rand(nheads) * 4 - 0.1, dt_bias=torch.randn(nheads),
        D=torch.randn(d_inner if d_per_channel else nheads),
        norm_weight=torch.rand(d_inner) + 0.5 if gated else None), d_inner + conv_dim + nheads


def as64(d):
    return {k: (v.double().clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@pytest.mark.parametrize("ngroups,d_per_channel,gated,before,dt_limit,with_bias", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba2_step_matches_float64_over_several_tokens(batch, ngroups, d_per_channel, gated, before,
                                                         dt_limit, with_bias):
    ours, width = step_inputs(batch, ngroups, d_per_channel, gated, with_bias)
    ref = as64(ours)
    for _ in range(5):  # state carried from token to token
        zxbcdt = torch.randn(batch, width) * 2
        y = mamba2_step(zxbcdt, **ours, norm_eps=1e-5, norm_before_gate=before, ngroups=ngroups,
                        dt_limit=dt_limit)
        y_ref = mamba2_step(zxbcdt.double(), **ref, norm_eps=1e-5, norm_before_gate=before,
                            ngroups=ngroups, dt_limit=dt_limit)
        close(y, y_ref, 1e-4)
        close(ours["conv_state"], ref["conv_state"])
        close(ours["ssm_state"], ref["ssm_state"], 1e-4)


@pytest.mark.parametrize("ngroups,d_per_channel,gated,before,dt_limit,with_bias", CASES[:2])
@pytest.mark.parametrize("with_residual", [False, True])
def test_mamba2_block_step_matches_float64(ngroups, d_per_channel, gated, before, dt_limit, with_bias,
                                           with_residual):
    batch, d_model = 2, 24
    ours, width = step_inputs(batch, ngroups, d_per_channel, gated, with_bias)
    norm_weight = ours.pop("norm_weight")
    d_inner = ours["ssm_state"].shape[1] * ours["ssm_state"].shape[2]
    ours.update(norm_weight=torch.rand(d_model) + 0.5, in_weight=torch.randn(width, d_model) * 0.2,
                in_bias=torch.randn(width) if with_bias else None, gate_norm_weight=norm_weight,
                out_weight=torch.randn(d_model, d_inner) * 0.2, out_bias=None)
    ref = as64(ours)
    hidden = torch.randn(batch, 1, d_model)
    residual = torch.randn(batch, 1, d_model) if with_residual else None
    kw = dict(norm_eps=1e-5, gate_eps=1e-5, norm_before_gate=before, ngroups=ngroups, dt_limit=dt_limit)
    out, res = mamba2_block_step(hidden, residual, **ours, **kw)
    out_ref, res_ref = mamba2_block_step(hidden.double(), None if residual is None else residual.double(),
                                         **ref, **kw)
    assert out.shape == hidden.shape and res.shape == hidden.shape
    close(res, res_ref)
    close(out, out_ref, 1e-4)
    close(ours["ssm_state"], ref["ssm_state"], 1e-4)


def test_decode_kernels_leave_the_float_mode_alone():
    # the step flushes denormals inside the kernel only
    torch.set_flush_denormal(False)
    ours, width = step_inputs(1, 1, False, True, True)
    mamba2_step(torch.randn(1, width), **ours)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert tiny.item() != 0.0 and (tiny * 0.5).item() != 0.0


def test_without_a_compiler_decoding_uses_torch(tmp_path):
    code = """
import torch
from kernels import decode, linear, mamba2_step
from mamba.model import MambaConfig, MambaLMHeadModel
torch.manual_seed(0)
ssm = {"layer": "Mamba2", "headdim": 8, "d_state": 8}
model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=ssm))
out = model.generate(torch.randint(0, 50, (2, 5)), 6)
print(decode.available(), tuple(out.shape), out[:, 5:].tolist())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAMBA_KERNELS_BUILD_DIR": str(tmp_path)}
    with_c = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env)
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=ROOT, env={**env, "CC": "/nonexistent/cc",
                                            "MAMBA_KERNELS_BUILD_DIR": str(tmp_path / "none")})
    assert with_c.stdout.startswith("True (2, 11)"), with_c.stderr
    assert without.stdout.startswith("False (2, 11)"), without.stderr
    assert with_c.stdout.split(")", 1)[1] == without.stdout.split(")", 1)[1]  # same tokens


def test_decoding_loop_runs_torch_single_threaded_and_restores_it():
    from mamba.model import MambaConfig, MambaLMHeadModel

    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50,
                                         ssm_cfg={"layer": "Mamba1"})).eval()
    before = torch.get_num_threads()
    seen = []
    model.generate(torch.randint(0, 50, (2, 3)), 3, streamer=lambda t: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
    seen.clear()  # more rows than the C kernels take: torch keeps its threads
    model.generate(torch.randint(0, 50, (decode.DECODE_MAX_ROWS + 1, 3)), 2,
                   streamer=lambda t: seen.append(torch.get_num_threads()))
    assert seen == [before, before]

    def fail(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.randint(0, 50, (1, 3)), 3, streamer=fail)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_mamba1_block_step_matches_float64_over_several_tokens(batch, with_residual, with_bias):
    from kernels import mamba1_block_step

    d_model, d_inner, n, rank, width = 24, 48, 6, 3, 4
    ours = dict(
        norm_weight=torch.rand(d_model) + 0.5, in_weight=torch.randn(2 * d_inner, d_model) * 0.2,
        in_bias=torch.randn(2 * d_inner) if with_bias else None,
        conv_state=torch.randn(batch, d_inner, width), ssm_state=torch.randn(batch, d_inner, n),
        conv_weight=torch.randn(d_inner, width) * 0.5, conv_bias=torch.randn(d_inner) if with_bias else None,
        x_proj_weight=torch.randn(rank + 2 * n, d_inner) * 0.2, dt_proj_weight=torch.randn(d_inner, rank),
        dt_bias=torch.randn(d_inner), A=-torch.rand(d_inner, n) * 4 - 0.1, D=torch.randn(d_inner),
        out_weight=torch.randn(d_model, d_inner) * 0.2, out_bias=torch.randn(d_model) if with_bias else None)
    ref = as64(ours)
    for _ in range(4):
        hidden = torch.randn(batch, 1, d_model)
        residual = torch.randn(batch, 1, d_model) if with_residual else None
        out, res = mamba1_block_step(hidden, residual, norm_eps=1e-5, **ours)
        out_ref, res_ref = mamba1_block_step(hidden.double(), None if residual is None else residual.double(),
                                             norm_eps=1e-5, **ref)
        close(res, res_ref)
        close(out, out_ref, 1e-4)
        close(ours["conv_state"], ref["conv_state"])
        close(ours["ssm_state"], ref["ssm_state"], 1e-4)


def test_mamba1_decay_cache_follows_new_weights():
    from mamba.model import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba1"})
    model, fresh = MambaLMHeadModel(config).eval(), MambaLMHeadModel(config).eval()
    prompt = torch.randint(0, 50, (1, 4))

    def step_logits(m):  # prefill, then one decode step (where -exp(A_log) is cached)
        with torch.inference_mode():
            cache = m.allocate_inference_cache(1, 5)
            m(prompt, inference_params=cache)
            cache.seqlen_offset = 4
            return m(prompt[:, -1:], inference_params=cache)

    step_logits(model)  # fills the cache
    with torch.no_grad():
        for layer in fresh.backbone.layers:
            layer.mixer.A_log.mul_(3.0)
    model.load_state_dict(fresh.state_dict())  # in-place copy into the same tensors
    close(step_logits(model), step_logits(fresh), 1e-6)
