"""SSD and Mamba-1 scan, forward + backward, against their textbook peers (fp32, CPU); the
decode-time linear layer against torch's F.linear.

Run: .venv/bin/python bench/bench_kernels.py [ssd] [scan] [decode]   (default: all three)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, machine  # noqa: E402
from textbook import selective_scan_sequential, ssd_textbook  # noqa: E402

from kernels import decode  # noqa: E402
from kernels.selective_scan import selective_scan_torch  # noqa: E402
from kernels.ssd import ssd_scan  # noqa: E402


def fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return run


def bench_ssd(repeats: int) -> None:
    # mamba2-130m layer: 24 heads x headdim 64 = d_inner 1536, d_state 128, 1 group
    b, length, h, p, g, n = 1, 2048, 24, 64, 1, 128
    x = torch.randn(b, length, h, p, requires_grad=True)
    dt = (torch.rand(b, length, h) * 0.1).requires_grad_()
    A = (-torch.rand(h) * 4).requires_grad_()
    B = torch.randn(b, length, g, n, requires_grad=True)
    C = torch.randn(b, length, g, n, requires_grad=True)
    print(f"SSD fwd+bwd, batch {b}, L {length}, {h} heads, headdim {p}, d_state {n}, {g} group")
    textbook = {q: best_of(fwd_bwd(lambda *a, q=q: ssd_textbook(*a, q), [x, dt, A, B, C]), repeats)
                for q in (64, 128, 256)}
    ours = {q: best_of(fwd_bwd(lambda *a, q=q: ssd_scan(*a, q), [x, dt, A, B, C]), repeats)
            for q in (32, 64, 128, 256)}
    for q, t in textbook.items():
        print(f"  textbook   chunk {q:4d}: {t * 1e3:7.1f} ms")
    for q, t in ours.items():
        print(f"  ours       chunk {q:4d}: {t * 1e3:7.1f} ms")
    tq, oq = min(textbook, key=textbook.get), min(ours, key=ours.get)
    print(f"  best: textbook {textbook[tq] * 1e3:.1f} ms (chunk {tq}), ours {ours[oq] * 1e3:.1f} ms "
          f"(chunk {oq}): {textbook[tq] / ours[oq]:.2f}x faster")


def bench_scan(repeats: int) -> None:
    # mamba-130m layer: d_inner 1536, d_state 16
    b, d, n, length = 1, 1536, 16, 1024
    u = torch.randn(b, d, length, requires_grad=True)
    delta = (torch.rand(b, d, length) * 0.1).requires_grad_()
    A = (-torch.rand(d, n) * 4).requires_grad_()
    B = torch.randn(b, n, length, requires_grad=True)
    C = torch.randn(b, n, length, requires_grad=True)
    inputs = [u, delta, A, B, C]
    print(f"Mamba-1 scan fwd+bwd, batch {b}, d_inner {d}, d_state {n}, L {length}")
    seq = best_of(fwd_bwd(selective_scan_sequential, inputs), max(2, repeats // 2))
    ours = best_of(fwd_bwd(lambda *a: selective_scan_torch(*a, use_c_kernel=True), inputs), repeats)
    print(f"  sequential torch scan: {seq * 1e3:7.1f} ms")
    print(f"  ours (C kernel)      : {ours * 1e3:7.1f} ms: {seq / ours:.1f}x faster")


def bench_decode_linear(repeats: int) -> None:
    """One decode step's linears at the mamba2-130m shape: 24 x (in_proj, out_proj) + lm_head.

    Every weight is a distinct tensor (516 MB in all, far beyond the caches), as in a real step,
    so both sides stream weights from memory. The roofline is a plain sum over the same bytes.
    """
    layers = [(torch.randn(3352, 768), torch.randn(768, 1536)) for _ in range(24)]
    head = torch.randn(50304, 768)
    weights = [w for pair in layers for w in pair] + [head]
    gbytes = sum(w.numel() for w in weights) * 4 / 1e9

    def step(fn, rows):
        x, y = torch.randn(rows, 768), torch.randn(rows, 1536)
        return lambda: ([(fn(x, a), fn(y, b)) for a, b in layers], fn(x, head))

    read = best_of(lambda: [w.sum() for w in weights], repeats)
    print(f"decode linears, mamba2-130m shape ({gbytes * 1e3:.0f} MB of fp32 weights per step); "
          f"reading them once (sum): {read * 1e3:.1f} ms = {gbytes / read:.1f} GB/s")
    for rows in (1, 4):
        ref = best_of(step(torch.nn.functional.linear, rows), repeats)
        ours = best_of(step(decode.linear, rows), repeats)
        print(f"  {rows} row(s): F.linear {ref * 1e3:6.1f} ms ({gbytes / ref:4.1f} GB/s), ours "
              f"{ours * 1e3:6.1f} ms ({gbytes / ours:4.1f} GB/s): {ref / ours:.2f}x faster")


if __name__ == "__main__":
    print(machine())
    sections = sys.argv[1:] or ["ssd", "scan", "decode"]
    if "ssd" in sections:
        bench_ssd(repeats=5)
    if "scan" in sections:
        bench_scan(repeats=5)
    if "decode" in sections:
        bench_decode_linear(repeats=5)
