"""The chunked Mamba-1 scan (kernels/selective_scan_chunked.py) against the float64 sequential
recurrence in kernels.reference: values, last state and gradients, with document resets inside
and across chunk edges and lengths that are not a multiple of the chunk; the dispatch picks it on
XLA; on torch-xla's CPU device it matches the CPU values and its graph does not grow with seq_len.

Also a worker: `python tests/test_selective_scan_chunked.py xla` (run in a fresh process, as
importing torch_xla changes the process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import backends_for, selective_scan_fn  # noqa: E402
from kernels.reference import selective_scan_ref  # noqa: E402
from kernels.selective_scan import selective_scan_torch  # noqa: E402
from kernels.selective_scan_chunked import CHUNK_SIZE  # noqa: E402

F64 = torch.float64
# 45 = 2 chunks of 16 and a partial one. Row 0: documents end at 5 (inside chunk 0), 16 (on the
# chunk edge), 17 (a 1-token document) and 40; row 1: one document runs across both chunk edges,
# then the value comes back to 0 (a new document all the same).
SEQ_IDX = [[0] * 5 + [1] * 11 + [2] + [3] * 23 + [4] * 5,
           [7] * 3 + [8] * 36 + [0] * 6]


def _inputs(b_form: str, length=45, dim=6, dstate=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = 2

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()

    B = {"batch": lambda: r(batch, dstate, length), "groups": lambda: r(batch, 2, dstate, length),
         "constant": lambda: r(dim, dstate)}[b_form]()
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length, scale=0.5),
                A=(-torch.rand(dim, dstate, generator=g, dtype=F64) * 4).requires_grad_(), B=B,
                C=r(batch, 3, dstate, length), D=r(dim), z=r(batch, dim, length), delta_bias=r(dim))


def _grads(out, inputs):
    y, state = out
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + state.square().sum()
    return torch.autograd.grad(loss, list(inputs.values()))


@pytest.mark.parametrize("b_form", ["batch", "groups", "constant"])
@pytest.mark.parametrize("documents", [False, True])
def test_chunked_matches_float64_reference_values_and_gradients(b_form, documents):
    inputs = _inputs(b_form)
    seq_idx = torch.tensor(SEQ_IDX, dtype=torch.int32) if documents else None
    ref = selective_scan_ref(**inputs, delta_softplus=True, seq_idx=seq_idx)
    ours = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True, seq_idx=seq_idx,
                                chunked=True)
    assert 45 % CHUNK_SIZE and ours[0].dtype == F64
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-10)
    for name, got, want in zip(inputs, _grads(ours, inputs), _grads(ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("length", [1, 16, 33])
def test_chunked_short_and_exact_lengths_float32(length):
    inputs = {k: v.detach().float() for k, v in _inputs("batch", length=length, seed=1).items()}
    seq_idx = torch.tensor([[0] * (length // 2) + [1] * (length - length // 2)] * 2)
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True,
                             seq_idx=seq_idx)
    y, state = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True, seq_idx=seq_idx,
                                    chunked=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), ref[1], rtol=1e-4, atol=1e-4)


def test_strong_decay_does_not_overflow():
    """delta * A of -1e4 per step (exp underflows to 0): the chunked form multiplies decays, so no
    inf / nan, as a closed form exp(cum_t - cum_s) split into exp(cum_t) * exp(-cum_s) would give."""
    inputs = {k: v.detach() for k, v in _inputs("batch", seed=2).items()}
    inputs["A"] = inputs["A"] * 1e3
    inputs["delta_bias"] = inputs["delta_bias"].abs() + 5
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    y, _ = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True, chunked=True)
    torch.testing.assert_close(y, ref[0], rtol=1e-10, atol=1e-10)


def test_dispatch_picks_chunked_on_xla_and_on_request(monkeypatch):
    monkeypatch.delenv("MAMBA_KERNELS", raising=False)
    assert backends_for("scan", torch.device("xla"))[0] == "chunked"
    assert "chunked" not in backends_for("scan", torch.device("cpu"))
    assert "chunked" not in backends_for("ssd", torch.device("xla"))
    monkeypatch.setenv("MAMBA_KERNELS", "chunked")
    assert backends_for("scan", torch.device("cpu")) == ["chunked", "torch"]
    assert backends_for("conv1d", torch.device("cpu")) == ["torch"]
    inputs = {k: v.detach().float() for k, v in _inputs("batch").items()}
    seq_idx = torch.tensor(SEQ_IDX)
    y = selective_scan_fn(**inputs, delta_softplus=True, seq_idx=seq_idx)
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True,
                             seq_idx=seq_idx)[0]
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


# ---- torch-xla's CPU device (a fresh process) ------------------------------------------------
def xla_worker() -> dict:
    """selective_scan_fn on XLA tensors: forward + backward values for a small packed batch, and
    the size of the lowered graph (forward and backward) at two lengths."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = torch_xla.device()
    inputs = {k: v.detach().float() for k, v in _inputs("batch").items()}
    seq_idx = torch.tensor(SEQ_IDX)
    on_xla = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
    y, state = selective_scan_fn(**on_xla, delta_softplus=True, return_last_state=True,
                                 seq_idx=seq_idx.to(device))
    loss = (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum() + state.square().sum()
    loss.backward()
    xm.mark_step()
    result = {"y": y.cpu().tolist(), "state": state.cpu().tolist(),
              "grads": {k: v.grad.cpu().tolist() for k, v in on_xla.items()}, "ops": {}}
    for length in (64, 256):
        small = {k: v.detach().float() for k, v in _inputs("batch", length=length).items()}
        small = {k: v.to(device).requires_grad_() for k, v in small.items()}
        seq = torch.zeros(2, length, dtype=torch.int32, device=device)
        out = selective_scan_fn(**small, delta_softplus=True, seq_idx=seq)
        out.square().sum().backward()
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([out] + [v.grad for v in small.values()])
        result["ops"][length] = sum(" = " in line for line in hlo.splitlines())
    return result


@pytest.fixture(scope="module")
def xla_result():
    if importlib.util.find_spec("torch_xla") is None:
        pytest.skip("needs torch-xla: pip install --no-deps -r neuron/requirements-cpu-test.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PJRT_DEVICE="CPU")
    env.pop("MAMBA_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, "xla"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_xla_forward_backward_match_cpu(xla_result):
    inputs = _inputs("batch")
    inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    ref = selective_scan_ref(**inputs, delta_softplus=True, seq_idx=torch.tensor(SEQ_IDX))
    want = _grads(ref, inputs)
    torch.testing.assert_close(torch.tensor(xla_result["y"], dtype=F64), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(xla_result["state"], dtype=F64), ref[1], rtol=1e-4, atol=1e-4)
    for (name, got), w in zip(xla_result["grads"].items(), want, strict=True):
        torch.testing.assert_close(torch.tensor(got, dtype=F64), w, rtol=1e-3, atol=1e-3,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def test_xla_graph_does_not_grow_with_seq_len(xla_result):
    """The step loop lowers to one copy of the step per position (4x the ops at 4x the length);
    the chunked scan adds two steps of the carry scan."""
    ops = xla_result["ops"]
    assert ops["256"] < 1.25 * ops["64"], ops


if __name__ == "__main__" and sys.argv[1:] == ["xla"]:
    print(json.dumps(xla_worker()))
