"""Our Triton kernels: GPU fast paths that need no compiler beyond the Triton inside torch's wheel.

  * selective_scan_triton: the Mamba-1 scan, forward and backward, with seq_idx document resets
    (mamba_ssm's CUDA scan has none), B/C shared or grouped, D, z gate, delta bias/softplus,
    return_last_state. Same contract as kernels.selective_scan.selective_scan_torch.
  * causal_conv1d_triton: depthwise causal conv1d, forward and backward, with seq_idx, initial
    and final states, channel-first or channel-last x. Same contract as
    kernels.conv1d.causal_conv1d_torch.
  * mamba_chunk_scan_combined_triton: the Mamba-2 SSD, forward and backward, chunked (C·Bᵀ once
    per group, dB / dC summed over a group's heads in registers), with seq_idx / cu_seqlens
    document resets and initial / final states. Same contract as
    kernels.ssd.mamba_chunk_scan_combined_torch, except return_varlen_states (torch path only).
  bf16 / fp16 / fp32 inputs, float32 arithmetic inside (the SSD's matrix products in TF32 for
  bf16 / fp16 inputs); results in the input's dtype.

Importing this package imports neither triton nor a GPU driver: the kernel modules load on
first call, so `import kernels.triton` works on a CPU-only machine and without triton. The
kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter: Triton 3.3 reads
TRITON_INTERPRET=1 when the kernel modules are imported, so set it before the first call.

Why our own SSD rather than fla-core (PyPI, MIT, pure Triton): Mamba-2 is its "simple GLA"
(q = C, k = B, v = dt * x, per-head log decay g = dt * A, scale 1, state stored [n, p]), but using
it means repeating B / C per head when ngroups < nheads, rebuilding packed rows as cu_seqlens
over the flattened batch with one initial state per document (only the row's first document
gets the row's state), taking final states from each row's last document, and pinning a
package that tracks Triton releases closely, whose compatibility with torch 2.7 / Triton 3.3
could not be checked without a GPU. The kernels here follow the ssd_ref recurrence exactly, share
C·Bᵀ across a group's heads instead of repeating B / C, and are covered by the same float64
tests and compile check as the rest of this folder.
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
                          return_last_state=False, cu_seqlens=None, seq_idx=None):
    """Mamba-1 scan. u/delta/z [b,d,l], A [d,n], B/C [d,n], [b,n,l] or [b,g,n,l], D/delta_bias [d];
    cu_seqlens [num_seqs+1] or seq_idx [b,l] reset the state between documents."""
    _require()
    from kernels.triton.selective_scan import selective_scan_triton as run

    return run(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
               return_last_state=return_last_state, cu_seqlens=cu_seqlens, seq_idx=seq_idx)


def causal_conv1d_triton(x, weight, bias=None, seq_idx=None, initial_states=None,
                         return_final_states=False, final_states_out=None, activation=None):
    """Depthwise causal conv. x [b,d,l], weight [d,w], bias [d], seq_idx [b,l] (negative = padding),
    initial_states [b,d,w-1]; final states [b,d,w-1] returned and/or written to final_states_out."""
    _require()
    from kernels.triton.conv1d import causal_conv1d_triton as run

    return run(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
               return_final_states=return_final_states, final_states_out=final_states_out,
               activation=activation)


def mamba_chunk_scan_combined_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                     initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                                     dt_limit=(0.0, float("inf")), return_final_states=False,
                                     return_varlen_states=False):
    """Mamba-2 SSD. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n], D [h] or [h,p], seq_idx [b,l]."""
    _require()
    from kernels.triton.ssd import mamba_chunk_scan_combined_triton as run

    return run(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
               seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
               return_final_states=return_final_states, return_varlen_states=return_varlen_states)


__all__ = ["available", "causal_conv1d_triton", "mamba_chunk_scan_combined_triton", "selective_scan_triton",
           "usable"]
