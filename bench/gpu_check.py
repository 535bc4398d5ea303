"""One-shot check of our Triton kernels on a GPU: each kernel, forward and backward, at real layer
sizes, against the float64 sequential references and the torch path (and mamba_ssm /
causal_conv1d where importable, on the calls they support), with timings; then, optionally, a
bf16 training step of mamba-130m- and mamba2-130m-shaped models. Needs torch + triton + this
repository only (no Composer, no network). Prints one table, writes it as JSON, and exits 1 when a
kernel disagrees with its reference.

Run on a GPU:    python bench/gpu_check.py [--json gpu_check.json] [--model-step]
Without a GPU:   python bench/gpu_check.py --interpret-smoke   (tiny shapes in Triton's CPU interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--interpret-smoke" in sys.argv:  # Triton reads this when the kernel modules are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.conv1d import causal_conv1d_torch  # noqa: E402
from kernels.reference import causal_conv1d_ref, selective_scan_ref, ssd_ref  # noqa: E402
from kernels.selective_scan import selective_scan_torch  # noqa: E402
from kernels.ssd import mamba_chunk_scan_combined_torch  # noqa: E402
from kernels.triton import (  # noqa: E402
    causal_conv1d_triton,
    mamba_chunk_scan_combined_triton,
    selective_scan_triton,
)

ROWS: list[dict] = []
FAILED: list[str] = []


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Best wall time of fn() in milliseconds, after one warm-up call (compiles, autotunes)."""
    if repeats == 0:  # --interpret-smoke: interpreter timings mean nothing
        return float("nan")
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def docs(batch: int, length: int, device) -> torch.Tensor:
    """Row 0: three documents with ragged boundaries; other rows: one document."""
    cuts = [0, max(1, length // 3 - 5), max(2, (2 * length) // 3 + 7)]
    row = torch.zeros(length, dtype=torch.int32)
    for i, c in enumerate(cuts):
        row[c:] = i
    out = torch.zeros(batch, length, dtype=torch.int32)
    out[0] = row
    return out.to(device)


def fwd_bwd(fn, inputs: dict, weights: list[torch.Tensor]):
    """Run fn(**inputs), backprop sum(out_i * w_i); returns (outputs, grads by name)."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=False))
    loss.backward()
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items() if v.grad is not None}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1.0)).item()


def compare(name: str, got, ref, tol: float) -> float:
    """Largest relative error over outputs and gradients; records a failure above tol."""
    (outs, grads), (routs, rgrads) = got, ref
    errs = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(outs, routs, strict=True))}
    errs.update({f"d{k}": rel_err(grads[k], rgrads[k]) for k in rgrads})
    worst = max(errs, key=errs.get)
    if errs[worst] > tol:
        FAILED.append(f"{name}: {worst} relative error {errs[worst]:.3g} > {tol:g}")
    return errs[worst]


def record(**row):
    ROWS.append(row)
    cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    print("  ".join(cells), flush=True)


def scan_inputs(b, d, n, length, dtype, device, gen):
    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    # B / C as the Mamba-1 mixer hands them over: [b,n,l] views of [b,l,n] tensors.
    t = dict(u=r(b, d, length), delta=r(b, d, length, scale=0.5, shift=-1.0), z=r(b, d, length),
             B=r(b, length, n).transpose(1, 2), C=r(b, length, n).transpose(1, 2))
    t = {k: v.to(dtype) for k, v in t.items()}
    t.update(A=-torch.exp(r(d, n, scale=0.5)), D=r(d), delta_bias=r(d, scale=0.1, shift=-2.0))
    return t


def check_scan(args, device, dtype, gen):
    b, d, n, length = args.batch, args.dim, args.dstate, args.seq_len
    name = f"scan {str(dtype)[6:]} b{b} d{d} n{n} l{length}"
    seq = docs(b, length, device)
    t = scan_inputs(b, d, n, length, dtype, device, gen)
    w_y = torch.randn(b, d, length, generator=gen, dtype=torch.float64).to(device)
    w_s = torch.randn(b, d, n, generator=gen, dtype=torch.float64).to(device)
    opts = dict(delta_softplus=True, seq_idx=seq)

    def ours(**kw):
        return selective_scan_triton(**kw, return_last_state=True, **opts)

    def torch_path(**kw):
        return selective_scan_torch(**kw, return_last_state=True, use_c_kernel=False, **opts)

    got = fwd_bwd(ours, t, [w_y, w_s])
    t64 = {k: v.double() for k, v in t.items()}
    ref = fwd_bwd(lambda **kw: selective_scan_ref(**kw, **opts), t64, [w_y, w_s])
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    err = compare(name, got, ref, tol)
    ms = timed(lambda: fwd_bwd(ours, t, [w_y, w_s]), device, args.repeats)
    ms_torch = float("nan") if args.no_torch else timed(lambda: fwd_bwd(torch_path, t, [w_y, w_s]), device,
                                                        min(1, args.repeats))  # a Python loop: slow
    row = dict(check=name, max_rel_err=err, tol=tol, triton_ms=ms, torch_ms=ms_torch,
               speedup_vs_torch=ms_torch / ms)
    ext = _mamba_ssm_scan()
    if ext is not None and device.type == "cuda":  # its scan has no resets: compare both without them
        # Its last state passes no gradient back, so only y enters the loss here.
        def theirs(**kw):
            return ext(**kw, delta_softplus=True)

        def mine(**kw):
            return selective_scan_triton(**kw, delta_softplus=True)

        try:
            row["vs_mamba_ssm_rel_err"] = compare(name + " vs mamba_ssm (no resets)", fwd_bwd(mine, t, [w_y]),
                                                  fwd_bwd(theirs, t, [w_y]), tol)
            row["mamba_ssm_ms_no_resets"] = timed(lambda: fwd_bwd(theirs, t, [w_y]), device, args.repeats)
            row["triton_ms_no_resets"] = timed(lambda: fwd_bwd(mine, t, [w_y]), device, args.repeats)
        except Exception as e:  # a mamba_ssm built for another torch / GPU
            row["mamba_ssm_error"] = repr(e)[:200]
    record(**row)


def check_conv(args, device, dtype, gen, dim, channel_last, label):
    b, length, width = args.batch, args.seq_len, 4
    name = f"conv1d {label} {str(dtype)[6:]} b{b} d{dim} l{length} {'channel-last' if channel_last else ''}"
    x = torch.randn(b, length, dim, generator=gen).to(device, dtype).transpose(1, 2) if channel_last else \
        torch.randn(b, dim, length, generator=gen).to(device, dtype)
    t = dict(x=x, weight=torch.randn(dim, width, generator=gen).to(device),
             bias=torch.randn(dim, generator=gen).to(device),
             initial_states=torch.randn(b, dim, width - 1, generator=gen).to(device, dtype))
    opts = dict(seq_idx=docs(b, length, device), activation="silu")
    w_y = torch.randn(b, dim, length, generator=gen, dtype=torch.float64).to(device)
    w_f = torch.randn(b, dim, width - 1, generator=gen, dtype=torch.float64).to(device)

    def ours(**kw):
        return causal_conv1d_triton(**kw, return_final_states=True, **opts)

    def torch_path(**kw):
        return causal_conv1d_torch(**kw, return_final_states=True, **opts)

    got = fwd_bwd(ours, t, [w_y, w_f])
    ref = fwd_bwd(lambda **kw: causal_conv1d_ref(**kw, **opts), {k: v.double() for k, v in t.items()},
                  [w_y, w_f])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = compare(name, got, ref, tol)
    ms = timed(lambda: fwd_bwd(ours, t, [w_y, w_f]), device, args.repeats)
    ms_torch = timed(lambda: fwd_bwd(torch_path, t, [w_y, w_f]), device, args.repeats)
    row = dict(check=name, max_rel_err=err, tol=tol, triton_ms=ms, torch_ms=ms_torch,
               speedup_vs_torch=ms_torch / ms)
    ext = _causal_conv1d_ext()
    if ext is not None and device.type == "cuda":  # no initial states there with seq_idx
        plain = dict(seq_idx=opts["seq_idx"], activation="silu")
        t2 = {k: v for k, v in t.items() if k != "initial_states"}
        try:
            row["causal_conv1d_ms"] = timed(lambda: fwd_bwd(lambda **kw: ext(**kw, **plain), t2, [w_y]),
                                            device, args.repeats)
            row["triton_ms_no_init"] = timed(
                lambda: fwd_bwd(lambda **kw: causal_conv1d_triton(**kw, **plain), t2, [w_y]), device,
                args.repeats)
        except Exception as e:
            row["causal_conv1d_error"] = repr(e)[:200]
    record(**row)


def check_ssd(args, device, dtype, gen):
    b, length, h, p, g, n = args.batch, args.seq_len, args.heads, args.headdim, args.ngroups, args.ssd_dstate
    name = f"ssd {str(dtype)[6:]} b{b} l{length} h{h} p{p} g{g} n{n}"

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    t = dict(x=r(b, length, h, p), dt=r(b, length, h, scale=0.5, shift=-2.0), B=r(b, length, g, n),
             C=r(b, length, g, n), z=r(b, length, h, p))
    t = {k: v.to(dtype) for k, v in t.items()}
    t.update(A=-torch.exp(r(h, scale=0.5)), D=r(h), dt_bias=r(h, scale=0.1),
             initial_states=r(b, h, p, n, scale=0.1))
    opts = dict(seq_idx=docs(b, length, device), dt_softplus=True)
    w_y = torch.randn(b, length, h, p, generator=gen, dtype=torch.float64).to(device)
    w_s = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64).to(device)

    def ours(**kw):
        return mamba_chunk_scan_combined_triton(**kw, chunk_size=256, return_final_states=True, **opts)

    def torch_path(**kw):
        return mamba_chunk_scan_combined_torch(**kw, chunk_size=256, return_final_states=True, **opts)

    got = fwd_bwd(ours, t, [w_y, w_s])
    ref = fwd_bwd(lambda **kw: ssd_ref(**kw, **opts), {k: v.double() for k, v in t.items()}, [w_y, w_s])
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    err = compare(name, got, ref, tol)
    ms = timed(lambda: fwd_bwd(ours, t, [w_y, w_s]), device, args.repeats)
    ms_torch = timed(lambda: fwd_bwd(torch_path, t, [w_y, w_s]), device, args.repeats)
    row = dict(check=name, max_rel_err=err, tol=tol, triton_ms=ms, torch_ms=ms_torch,
               speedup_vs_torch=ms_torch / ms)
    if device.type == "cuda":
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as ext

            def theirs(**kw):
                return ext(**kw, chunk_size=256, return_final_states=True, **opts)

            # without initial states: not every mamba_ssm release takes them together with seq_idx
            t2 = {k: v for k, v in t.items() if k != "initial_states"}
            mine = fwd_bwd(ours, t2, [w_y, w_s])
            row["vs_mamba_ssm_rel_err"] = compare(name + " vs mamba_ssm (no initial states)", mine,
                                                  fwd_bwd(theirs, t2, [w_y, w_s]), tol)
            row["mamba_ssm_ms_no_init"] = timed(lambda: fwd_bwd(theirs, t2, [w_y, w_s]), device, args.repeats)
            row["triton_ms_no_init"] = timed(lambda: fwd_bwd(ours, t2, [w_y, w_s]), device, args.repeats)
        except Exception as e:  # not installed, or built for another torch / GPU
            row["mamba_ssm"] = repr(e)[:200]
    record(**row)


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch / CUDA
        return None
    return selective_scan_fn


def _causal_conv1d_ext():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def bf16_matmul_tflops(device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ a, device, 10)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def _train_step(model, opt, ids, seq):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, seq_idx=seq, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def check_model_step(args, device):
    """A bf16 (autocast) training step of 130m-shaped models, rows packed with three documents."""
    from kernels import backend_for
    from mamba.model import MambaConfig, MambaLMHeadModel
    from mamba.model.flops import training_flops

    peak = bf16_matmul_tflops(device)
    for layer in ("Mamba1", "Mamba2"):
        config = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={"layer": layer},
                             pad_vocab_size_multiple=16)
        model = MambaLMHeadModel(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 50277, (args.step_batch, args.seq_len), device=device)
        seq = docs(args.step_batch, args.seq_len, device)
        ms = timed(lambda: _train_step(model, opt, ids, seq), device, 3)
        tflops = training_flops(config, args.step_batch, args.seq_len) / (ms / 1e3) / 1e12
        record(check=f"train step {layer.lower()}-130m bf16 b{args.step_batch} l{args.seq_len}",
               step_ms=ms, model_tflops=tflops, bf16_peak_tflops=peak, mfu=tflops / peak,
               scan_backend=backend_for("scan", device), conv_backend=backend_for("conv1d", device))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny shapes on CPU in Triton's interpreter (checks this script without a GPU)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=1536, help="Mamba-1 d_inner (mamba-130m: 1536)")
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=24, help="Mamba-2 heads (mamba2-130m: 24)")
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--ssd-dstate", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", choices=["auto", "torch", "triton", "cuda-ext"], default="auto",
                    help="MAMBA_KERNELS for the model steps (the dispatch's choice per op)")
    ap.add_argument("--no-torch", action="store_true", help="skip timing the (slow) torch scan loop")
    ap.add_argument("--model-step", action="store_true", help="also time 130m-shaped training steps")
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args()
    for name in ("batch", "dim", "dstate", "seq_len", "repeats", "step_batch", "heads", "headdim", "ngroups",
                 "ssd_dstate"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.interpret_smoke:
        device = torch.device("cpu")
        args.batch, args.dim, args.dstate, args.seq_len, args.repeats = 2, 6, 4, 37, 0
        args.heads, args.headdim, args.ngroups, args.ssd_dstate = 4, 3, 2, 5
        conv_dims = [(6, False, "mamba1"), (10, True, "mamba2")]
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --interpret-smoke for a CPU check of this script")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 torch path as a reference, not tf32
        conv_dims = [(args.dim, True, "mamba1-130m"), (args.dim + 2 * 128, True, "mamba2-130m")]
        print(torch.cuda.get_device_name(device), f"torch {torch.__version__}", flush=True)
    if args.heads % args.ngroups:
        ap.error(f"--ngroups {args.ngroups} must divide --heads {args.heads}")
    if args.kernels != "auto":
        os.environ["MAMBA_KERNELS"] = args.kernels
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        check_scan(args, device, dtype, gen)
        for dim, channel_last, label in conv_dims:
            check_conv(args, device, dtype, gen, dim, channel_last, label)
        check_ssd(args, device, dtype, gen)
    if args.model_step and device.type == "cuda":
        check_model_step(args, device)
    args.json.write_text(json.dumps({"device": str(device) if device.type == "cpu" else
                                     torch.cuda.get_device_name(device), "rows": ROWS, "failed": FAILED},
                                    indent=1))
    print(f"{len(ROWS)} rows in {time.perf_counter() - start:.0f} s -> {args.json}")
    for line in FAILED:
        print("MISMATCH", line)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
