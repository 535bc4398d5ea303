"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import time

import torch


def best_of(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of fn() over repeats, after warmup calls (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 GEMM throughput of this machine (the denominator for MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_of(lambda: a @ b, repeats) / 1e9


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
