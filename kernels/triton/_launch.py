"""What every Triton kernel module here needs before it defines a kernel.

Importing this module imports triton (callers guard that). Nothing here touches a GPU driver:
triton.autotune looks one up when it is built unless it is given its own benchmark function,
so `autotune` below passes one that only runs when a launch actually benchmarks configs.
"""

from __future__ import annotations

import os

import torch
import triton

# Triton 3.3 reads TRITON_INTERPRET when a @triton.jit decorator runs (at import of the kernel
# modules, which import this one first), not at launch; so is it read here.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter."""
    return _INTERPRET


def _bench(fn, quantiles):
    import triton.testing

    return triton.testing.do_bench(fn, quantiles=quantiles)


def autotune(configs: list, key: list[str]):
    """triton.autotune that needs no driver at import; in the interpreter only the first config
    runs (benchmarking configs there would only cost time)."""
    if interpreting():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, do_bench=_bench)


def check_device(*tensors: torch.Tensor | None) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                         "before importing kernels.triton, or use the torch path")


def check_dtype(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16 "
                        "(use the torch path for float64)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
