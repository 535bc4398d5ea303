"""SSD and Mamba-1 scan, forward + backward, against their textbook peers (fp32, CPU).

Run: .venv/bin/python bench/bench_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, machine  # noqa: E402
from textbook import selective_scan_sequential, ssd_textbook  # noqa: E402

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


if __name__ == "__main__":
    print(machine())
    bench_ssd(repeats=5)
    bench_scan(repeats=5)
