"""Memory of one real-size training step on CPU, fp32: an accounting (weights, gradients, AdamW
state, activations per layer computed and measured, the LM head's loss) against the measured
peak RSS. Each configuration runs in a fresh process (OMP_NUM_THREADS=1): full steps (forward,
loss, backward, AdamW with its state already allocated) of ComposerMamba, the recipe's model and
loss, with glibc's default allocator settings and with large blocks returned to the OS.

Run: .venv/bin/python bench/bench_memory.py                      # mamba2-130m, 1x2048 and 1x8192,
                                                                 # with and without checkpointing
     .venv/bin/python bench/bench_memory.py --tokens 2048 --layers 4 --malloc mmap
Peak RSS is meaningful on a shared machine; the step times printed are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def model_config(yaml_path: Path, layers: int | None):
    import yaml

    from mamba.model import MambaConfig

    section = yaml.safe_load(yaml_path.read_text())["model"]
    known = set(MambaConfig.__dataclass_fields__)
    values = {k: v for k, v in section.items() if k in known}
    if layers:
        values["n_layer"] = layers
    return MambaConfig(**values)


def computed_layer_bytes(config, tokens: int) -> dict[str, int]:
    """What autograd keeps per Mamba-2 block for `tokens` tokens, term by term, fp32, as the code
    is written today (kernels/conv1d.py, kernels/ssd.py on CPU with 64-token chunks, mamba2.py)."""
    from kernels.ssd import CPU_CHUNK_SIZE

    o = config.ssm_options("M")
    T, d, Q = tokens, config.d_model, CPU_CHUNK_SIZE
    di = o["expand"] * d
    h, g, n, w = di // o["headdim"], o["ngroups"], o["d_state"], o["d_conv"]
    conv = di + 2 * g * n
    chunks = -(-T // Q)
    terms = {
        "residual stream (block input)": T * d,
        "RMSNorm output (in_proj input)": T * d + T,
        "conv input, padded": conv * (T + w - 1),
        "conv output before SiLU": conv * T,
        "conv output after SiLU (x, B, C)": conv * T,
        "dt (softplus input, dt, cumsums W E)": 5 * T * h,
        "SSD intra-chunk decay Lm [c,h,Q,Q]": chunks * h * Q * Q,
        "SSD Lm*CB [c,h,Q,Q] (recomputable)": chunks * h * Q * Q,
        "SSD CB [c,g,Q,Q]": chunks * g * Q * Q,
        "SSD x*dt (recomputable)": T * di,
        "SSD C.state (recomputable)": T * di,
        "SSD chunk states [c,g,n,di/g]": chunks * n * di,
        "scan output y (gated-norm input)": T * di,
        "gate z": T * di,
        "gated-norm output (out_proj input)": T * di,
    }
    return {k: 4 * v for k, v in terms.items()}


def accounting(config, tokens: int, checkpointing: bool, n_params: int) -> dict[str, int]:
    from mamba.model.loss import CHUNK_BYTES

    d, T = config.d_model, tokens
    layer = sum(computed_layer_bytes(config, tokens).values())
    kept = 2 * T * d * 4 * config.n_layer + layer if checkpointing else layer * config.n_layer
    return {
        "weights": 4 * n_params,
        "gradients": 4 * n_params,
        "AdamW state (exp_avg, exp_avg_sq)": 8 * n_params,
        ("activations: block inputs + one block recomputed" if checkpointing
         else "activations: all blocks"): kept,
        "final norm + LM head loss (hidden, its gradient, one logits chunk)": 3 * T * d * 4 + CHUNK_BYTES,
    }


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch

    from mamba.composer_model import ComposerMamba, apply_block_checkpointing, return_large_frees_to_the_os

    if args.malloc == "mmap" and not return_large_frees_to_the_os():
        raise SystemExit("mallopt unavailable (not glibc)")
    torch.manual_seed(0)
    runtime = rss_mb()
    config = model_config(ROOT / args.yaml, args.layers)
    model = ComposerMamba(config)
    if args.checkpointing:
        apply_block_checkpointing(model.model)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels}

    storages: dict[int, dict[int, int]] = {}
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    current = [-1]

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs and current[0] >= 0:
            storages.setdefault(current[0], {})[st.data_ptr()] = st.nbytes()
        return t

    for p in params:  # AdamW's state exists from the first measured step on
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    hooks = []
    for i, block in enumerate(model.model.backbone.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        if step == 0:  # measure what autograd keeps per block (the hooks return tensors as they are)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(batch)
        else:
            out = model(batch)
        loss = model.loss(out, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out, loss
        times.append(time.perf_counter() - start)
    for hook in hooks:
        hook.remove()
    measured = [sum(v.values()) for _, v in sorted(storages.items())]
    return {"tokens": args.tokens, "checkpointing": args.checkpointing, "layers": config.n_layer,
            "malloc": args.malloc,
            "params": n_params, "runtime_rss_mb": runtime, "peak_rss_mb": peak_rss_mb(),
            "layer_measured_mb": (sum(measured) / len(measured) / MB) if measured else 0.0,
            "layer_computed": computed_layer_bytes(config, args.tokens),
            "accounting": accounting(config, args.tokens, args.checkpointing, n_params),
            "step_seconds": times}


def report(r: dict) -> None:
    acc = r["accounting"]
    total = sum(acc.values()) / MB + r["runtime_rss_mb"]
    label = (f"1 x {r['tokens']} tokens, {r['layers']} layers, checkpointing "
             f"{'on' if r['checkpointing'] else 'off'}, malloc {r['malloc']}")
    print(f"\n## {label}  ({r['params'] / 1e6:.1f}M parameters)")
    print(f"  {'runtime (python, torch, composer; RSS before the model)':<66} {r['runtime_rss_mb']:9.0f} MB")
    for name, nbytes in acc.items():
        print(f"  {name:<66} {nbytes / MB:9.0f} MB")
    print(f"  {'accounting total':<66} {total:9.0f} MB")
    print(f"  {'measured peak RSS':<66} {r['peak_rss_mb']:9.0f} MB   ({r['peak_rss_mb'] / total:.2f}x)")
    computed = sum(r["layer_computed"].values()) / MB
    measured = ("n/a (checkpointed blocks keep their inputs, not saved tensors)" if r["checkpointing"]
                else f"{r['layer_measured_mb']:.1f} MB (saved-tensor hooks)")
    print(f"  per block activations: computed {computed:.1f} MB, measured {measured}")
    print("  step seconds (shared machine, not a benchmark): "
          + ", ".join(f"{t:.1f}" for t in r["step_seconds"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--yaml", default="yamls/pretrain/mamba2-130m.yaml", help="its model section is used")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--layers", type=int, help="override n_layer (quick runs)")
    ap.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    ap.add_argument("--malloc", choices=("default", "mmap", "both"), default="both",
                    help="glibc's default, or mmap for allocations over 1 MB "
                         "(mamba.composer_model.return_large_frees_to_the_os)")
    ap.add_argument("--steps", type=int, default=2, help="training steps measured per configuration")
    ap.add_argument("--max-gb", type=float, default=18.0,
                    help="skip a configuration whose accounting exceeds this (shared machines)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        args.tokens = args.tokens[0]
        args.checkpointing = args.checkpointing == "on"
        print("RESULT " + json.dumps(child(args)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from common import machine

    torch.set_num_threads(1)
    print(machine())
    config = model_config(ROOT / args.yaml, args.layers)
    n_params = sum(p.numel() for p in __import__("mamba.model", fromlist=["x"]).MambaLMHeadModel(
        config, device="meta").parameters())
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    mallocs = ["default", "mmap"] if args.malloc == "both" else [args.malloc]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for tokens in args.tokens:
        for ckpt in modes:
            need = sum(accounting(config, tokens, ckpt, n_params).values()) / 2**30
            if need > args.max_gb:
                print(f"\n## 1 x {tokens}, checkpointing {'on' if ckpt else 'off'}: skipped, the "
                      f"accounting is {need:.1f} GB > --max-gb {args.max_gb}")
                continue
            for malloc in mallocs:
                cmd = [sys.executable, __file__, "--child", "--yaml", args.yaml, "--tokens", str(tokens),
                       "--checkpointing", "on" if ckpt else "off", "--malloc", malloc,
                       "--steps", str(args.steps)] + (["--layers", str(args.layers)] if args.layers else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(f"\n## 1 x {tokens}, checkpointing {ckpt}, malloc {malloc}: failed "
                          f"({proc.returncode})\n{proc.stderr[-2000:]}")
                    continue
                report(json.loads(lines[0][len("RESULT "):]))


if __name__ == "__main__":
    main()
