"""Our Triton kernels: GPU fast paths that need no compiler beyond the Triton inside torch's wheel.

  * selective_scan_triton: the Mamba-1 scan, forward and backward, with seq_idx document resets
    (mamba_ssm's CUDA scan has none), B/C shared or grouped, D, z gate, delta bias/softplus,
    return_last_state. Same contract as kernels.selective_scan.selective_scan_torch.
  * causal_conv1d_triton: depthwise causal conv1d, forward and backward, with seq_idx, initial
    and final states, channel-first or channel-last x. Same contract as
    kernels.conv1d.causal_conv1d_torch.
  bf16 / fp16 / fp32 inputs, float32 arithmetic inside; results in the input's dtype.

Importing this package imports neither triton nor a GPU driver: the kernel modules load on
first call, so `import kernels.triton` works on a CPU-only machine and without triton. The
kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter: Triton 3.3 reads
TRITON_INTERPRET=1 when the kernel modules are imported, so set it before the first call.

Mamba-2 SSD: not here yet. Our Mamba-2 paths stay mamba_ssm's Triton SSD (when installed)
or the chunked torch SSD (kernels/ssd.py), which already runs on a GPU as batched matmuls.
The candidate for a compiled-nothing GPU path is fla-core (PyPI, MIT licence, pure Triton):
Mamba-2 is its "simple GLA" with q = C, k = B, v = dt * x, per-head log decay g = dt * A,
scale 1, state stored [n, p] rather than [p, n]; D * x and the z gate stay outside; ngroups < nheads
needs B / C repeated per head; packed rows map to its cu_seqlens over the flattened batch (one
sequence per document, the row's initial state given to its first document only, the final
state taken from its last). Not adopted in this change because its torch 2.7 / Triton 3.3
compatibility and its numbers against mamba_ssm can only be checked on a GPU, which this change
did not have; bench/gpu_check.py is the place to add that comparison.
"""

from __future__ import annotations

import importlib.util

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """True where triton is importable (a CUDA device or TRITON_INTERPRET=1 is still needed to run)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def usable(*tensors) -> bool:
    """True where dispatch may send these tensors (None entries ignored) here: triton is installed, all are
    CUDA tensors, and the floating ones are float32, float16 or bfloat16."""
    present = [t for t in tensors if t is not None]
    return (available() and bool(present) and all(t.device.type == "cuda" for t in present)
            and all(t.dtype in _DTYPES for t in present if t.is_floating_point()))


def _require():
    if not available():
        raise ImportError("the Triton kernels need the triton package (it ships with torch's CUDA wheels); "
                          "use the torch path (MAMBA_KERNELS=torch) where it is missing")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, seq_idx=None):
    """Mamba-1 scan. u/delta/z [b,d,l], A [d,n], B/C [b,n,l] or [b,g,n,l], D/delta_bias [d], seq_idx [b,l]."""
    _require()
    from kernels.triton.selective_scan import selective_scan_triton as run

    return run(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
               return_last_state=return_last_state, seq_idx=seq_idx)


def causal_conv1d_triton(x, weight, bias=None, seq_idx=None, initial_states=None,
                         return_final_states=False, activation=None):
    """Depthwise causal conv. x [b,d,l], weight [d,w], bias [d], seq_idx [b,l], initial_states [b,d,w-1]."""
    _require()
    from kernels.triton.conv1d import causal_conv1d_triton as run

    return run(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
               return_final_states=return_final_states, activation=activation)


__all__ = ["available", "causal_conv1d_triton", "selective_scan_triton", "usable"]
