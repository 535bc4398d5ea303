"""A NumPy executor of the subset of the Neuron Kernel Interface that kernels/nki uses.

It is a semantics checker, not a performance model and not a compiler: it runs the unmodified
kernel source one SPMD program after another and checks what a NeuronCore would refuse
  * tiles of more than 128 partitions, SBUF tiles over 192 KiB per partition, PSUM tiles over
    one 2 KiB bank, live tiles over the SBUF (192 KiB) or PSUM (16 KiB) of a partition (a tile
    counts while Python references it: an upper bound on the compiler's liveness);
  * nc_matmul limits (contraction <= 128 on partitions, stationary free <= 128, moving free
    <= 512, SBUF operands of one dtype, fp32 result in PSUM), transposes over 128x128;
  * compute on HBM tensors (everything is nl.load-ed first) and nl.store from PSUM;
  * a tensor-tensor instruction (nisa.tensor_tensor / scalar_tensor_tensor, and every nl.* op or
    operator on two or more tiles) with more than one input tile in PSUM (NKI ISA,
    nki.isa.tensor_tensor: data1 and data2 cannot both reside in PSUM);
  * a read of an on-chip element that was never written (fresh buffers hold NaN and are
    tracked as unwritten);
  * a loop-carried dependency inside nl.affine_range (its iterations run in reverse here).
bf16 tiles hold float32 values rounded to bf16 (round to nearest even); arithmetic runs in
fp32, matmuls accumulate in fp64 and round to fp32. `core.counters` counts matmul FLOPs,
element-wise work and HBM bytes, nothing about time.

The names and signatures follow the public NKI API reference (neuronxcc.nki.language,
neuronxcc.nki.isa). Use `install()` to make `import neuronxcc.nki` resolve here: only in tests,
or when a caller asks explicitly; it refuses to shadow a real neuronxcc.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import numpy as np

from kernels.nki.executor import core, isa, language
from kernels.nki.executor.core import HardwareLimitError, ReadBeforeWriteError, Tensor, counters

__all__ = ["HardwareLimitError", "ReadBeforeWriteError", "counters", "hbm_tensor", "install", "installed",
           "jit", "real_neuronxcc_present", "simulate_kernel", "uninstall"]

_NP_DTYPES = {np.dtype(np.float32): core.float32, np.dtype(np.int32): core.int32,
              np.dtype(np.float16): core.float16, np.dtype(np.uint8): core.uint8}


def hbm_tensor(array, dtype=None) -> Tensor:
    """A kernel argument in HBM from a NumPy array; dtype=language.bfloat16 rounds to bf16."""
    array = np.asarray(array)
    if dtype is None:
        if array.dtype not in _NP_DTYPES:
            raise TypeError(f"NKI tensors are float32/bfloat16/float16/int32/uint8; got {array.dtype}")
        dtype = _NP_DTYPES[array.dtype]
    return Tensor(core.cast(array, dtype), dtype, "hbm")


def _from_torch(t):
    import torch

    if t.dtype == torch.bfloat16:
        return hbm_tensor(t.detach().float().cpu().numpy(), core.bfloat16)
    return hbm_tensor(t.detach().cpu().numpy())


def _to_torch(tensor: Tensor, like):
    import torch

    out = torch.from_numpy(np.array(tensor.data))
    if tensor.dtype is core.bfloat16:
        out = out.to(torch.bfloat16)
    return out.to(like.device)


class Kernel:
    """What `nki.jit` returns: call it, or launch an SPMD grid with kernel[d0, d1, ...](...)."""

    def __init__(self, fn, grid=()):
        self.fn, self.grid = fn, grid
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid):
        grid = grid if isinstance(grid, tuple) else (grid,)
        return Kernel(self.fn, tuple(int(g) for g in grid))

    def __call__(self, *args, **kwargs):
        import torch

        like = next((a for a in args if isinstance(a, torch.Tensor)), None)
        args = [_from_torch(a) if isinstance(a, torch.Tensor)
                else hbm_tensor(a) if isinstance(a, np.ndarray) else a for a in args]
        launch = language.launch
        launch.grid, launch.shared = self.grid, []
        result = None
        try:
            for ids in np.ndindex(*self.grid) if self.grid else [()]:
                launch.ids, launch.n_shared = tuple(int(i) for i in ids), 0
                core._Budget.new_launch()  # each program instance has the whole SBUF / PSUM
                result = self.fn(*args, **kwargs)
        finally:
            launch.grid, launch.ids, launch.shared = (), (), []
        return _outputs(result, like)


def _outputs(result, like):
    if result is None:
        return None
    if isinstance(result, (tuple, list)):
        return type(result)(_outputs(r, like) for r in result)
    if not (isinstance(result, Tensor) and result.buffer == "hbm"):
        raise HardwareLimitError(f"a kernel returns HBM tensors; got {result!r}")
    return _to_torch(result, like) if like is not None else np.array(result.data)


def jit(fn=None, **kwargs):
    if fn is None:
        return lambda f: Kernel(f)
    return Kernel(fn)


def simulate_kernel(kernel, *args, **kwargs):
    return kernel(*args, **kwargs)


_NAMES = ("neuronxcc", "neuronxcc.nki", "neuronxcc.nki.language", "neuronxcc.nki.isa")
_shadowed: dict = {}  # stand-in modules (no file behind them) that install() replaced


def installed() -> bool:
    return getattr(sys.modules.get("neuronxcc"), "__nki_executor__", False)


def real_neuronxcc_present() -> bool:
    """A neuronxcc with files behind it (the Neuron compiler), imported or importable. Empty
    stand-in modules (neuron/runtime.py registers some without the SDK) do not count."""
    top = sys.modules.get("neuronxcc")
    if top is not None:
        return getattr(top, "__file__", None) is not None
    try:
        return importlib.util.find_spec("neuronxcc") is not None
    except (ImportError, ValueError):
        return False


def install() -> None:
    """Make neuronxcc.nki (language, isa, jit) resolve to this executor. Refuses to shadow a real
    neuronxcc; stand-in modules are set aside and come back with uninstall()."""
    if installed():
        return
    if real_neuronxcc_present():
        raise RuntimeError("a real neuronxcc is importable; the NumPy executor will not shadow it")
    for name in list(sys.modules):
        if name == "neuronxcc" or name.startswith("neuronxcc."):
            _shadowed[name] = sys.modules.pop(name)
    top = types.ModuleType("neuronxcc")
    top.__path__ = []
    top.__spec__ = importlib.machinery.ModuleSpec("neuronxcc", None, is_package=True)
    top.__nki_executor__ = True
    nki = types.ModuleType("neuronxcc.nki")
    nki.__path__ = []
    nki.__spec__ = importlib.machinery.ModuleSpec("neuronxcc.nki", None, is_package=True)
    nki.jit, nki.simulate_kernel, nki.language, nki.isa = jit, simulate_kernel, language, isa
    top.nki = nki
    for name, module in zip(_NAMES, (top, nki, language, isa), strict=True):
        sys.modules[name] = module


def uninstall() -> None:
    if installed():
        for name in _NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(_shadowed)
        _shadowed.clear()
