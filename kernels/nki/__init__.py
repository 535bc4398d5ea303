"""NKI kernels for Trainium (Mamba-2 SSD, causal conv1d; forward and backward, with seq_idx).

The kernel modules import `neuronxcc.nki`, so nothing here imports them until asked:
  * `nki_available()` says whether a neuronxcc is importable;
  * `kernels.nki.autograd` holds the torch.autograd.Functions that call the kernels (for
    tensors on an XLA device, through `@nki.jit`);
  * `kernels.nki.executor` is a NumPy executor of the NKI subset the kernels use, so tests run
    the unmodified kernel source on CPU (`executor.install()`).
"""

from __future__ import annotations

import importlib.util
import sys

CHUNK = 128  # tokens per SSD chunk and per conv time tile: the partition count of a NeuronCore


def nki_available() -> bool:
    """True when `neuronxcc.nki` can be imported (the real compiler, or the executor once installed)."""
    if "neuronxcc" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("neuronxcc") is not None
    except (ImportError, ValueError):
        return False


def check_length(length: int) -> None:
    """The NKI kernels tile the sequence in 128-token chunks; other lengths are refused."""
    if length % CHUNK:
        raise ValueError(f"sequence length {length} is not a multiple of {CHUNK}, which the NKI kernels "
                         f"need; pad the batch to a multiple of {CHUNK} or set MAMBA_KERNELS=torch")
