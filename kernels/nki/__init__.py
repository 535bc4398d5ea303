"""NKI kernels for Trainium, forward and backward: Mamba-2 SSD and causal conv1d (with seq_idx),
Mamba-2's grouped gated RMSNorm.

The kernel modules import `neuronxcc.nki`, so nothing here imports them until asked:
  * `nki_available()` says whether the real neuronxcc is importable, `nki_enabled(device)`
    whether the kernels serve a tensor on that device;
  * `kernels.nki.autograd` holds the torch.autograd.Functions that call the kernels (for
    tensors on an XLA device, through `@nki.jit`);
  * `kernels.nki.executor` is a NumPy executor of the NKI subset the kernels use, so tests run
    the unmodified kernel source on CPU (`executor.install()`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

CHUNK = 128  # tokens per SSD chunk (one per partition); sequence lengths are whole chunks


def nki_available() -> bool:
    """True when the real Neuron compiler's NKI (neuronxcc.nki with jit, language, isa) imports:
    not our NumPy executor, and not the empty stand-in modules neuron/runtime.py registers so
    that neuronx-distributed imports without the SDK."""
    top = sys.modules.get("neuronxcc")
    if top is None:
        try:
            if importlib.util.find_spec("neuronxcc") is None:
                return False
        except (ImportError, ValueError):
            return False
    elif getattr(top, "__nki_executor__", False) or getattr(top, "__file__", None) is None:
        return False
    try:
        nki = importlib.import_module("neuronxcc.nki")
        importlib.import_module("neuronxcc.nki.language")
        importlib.import_module("neuronxcc.nki.isa")
    except ImportError:
        return False
    return callable(getattr(nki, "jit", None))


def nki_enabled(device) -> bool:
    """The NKI kernels serve tensors on an XLA device when the real compiler is there, unless
    MAMBA_KERNELS=torch."""
    return (os.environ.get("MAMBA_KERNELS") != "torch" and getattr(device, "type", None) == "xla"
            and nki_available())


def check_length(length: int) -> None:
    """The NKI kernels tile the sequence in 128-token chunks; other lengths are refused."""
    if length % CHUNK:
        raise ValueError(f"sequence length {length} is not a multiple of {CHUNK}, which the NKI kernels "
                         f"need; pad the batch to a multiple of {CHUNK} or set MAMBA_KERNELS=torch")
