"""Where neuron/ runs and how it joins its ranks.

Three modes, chosen by the environment the Neuron SDK and torchrun already use:
  * neuron  — trn1/trn2 (the Neuron SDK installed; PJRT_DEVICE=NEURON): XLA devices, `xla` backend.
  * xla_cpu — PJRT_DEVICE=CPU, or no Neuron SDK and no PJRT_DEVICE: torch-xla's CPU device, one
              process only (it has no cross-process collectives: 2 ranks would run unconnected).
  * cpu     — NXD_CPU_MODE=1: neuronx-distributed's CPU mode, plain CPU tensors, gloo; real
              multi-rank tensor parallelism (how the TP tests run without Trainium).

Without the Neuron SDK (torch_neuronx / neuronxcc absent), neuronx-distributed still imports
once a few of their names are stood in for; they belong to NKI kernels and inference tracing,
which this trainer never calls. With the SDK installed the real packages are used, untouched.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import torch

NEURON, XLA_CPU, CPU = "neuron", "xla_cpu", "cpu"


_SDK: list[bool] = []


def neuron_sdk_present() -> bool:
    """torch-neuronx installed (decided once, before any stand-in is registered)."""
    if not _SDK:
        try:
            _SDK.append(importlib.util.find_spec("torch_neuronx") is not None)
        except ValueError:  # a module without a spec: a stand-in
            _SDK.append(False)
    return _SDK[0]


def mode() -> str:
    if int(os.environ.get("NXD_CPU_MODE", "0") or 0) > 0:
        return CPU
    device = os.environ.get("PJRT_DEVICE")
    if device == "CPU" or (device is None and not neuron_sdk_present()):
        return XLA_CPU
    return NEURON


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so that submodules resolve
    sys.modules[name] = module
    return module


class _NeedsNeuronSDK:
    """Stands in for an inference-tracing class; using it says what is missing."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("this neuronx-distributed feature needs the Neuron SDK (torch-neuronx)")


class _CollectivesConfig:
    """Ring-attention send/receive pairs; context parallelism is not used here."""

    def __init__(self, replica_groups=None, **kwargs):
        self.rank_src_tgt_pairs = collections.defaultdict(list)


def _stand_in_for_neuron_sdk() -> bool:
    """Register stand-ins when the Neuron SDK is missing; True if it did. Never defines
    libneuronxla.libneuronpjrt_path (torch_xla would switch itself to Neuron mode)."""
    if neuron_sdk_present() or "torch_neuronx" in sys.modules:
        return False
    _module("torch_neuronx")
    _module("torch_neuronx.utils", get_platform_target=lambda: "trn1")
    _module("torch_neuronx.xla_impl")
    _module("torch_neuronx.xla_impl.ops", Argmax=None, Softmax=None, TopK=None)
    if "neuronxcc" not in sys.modules and importlib.util.find_spec("neuronxcc") is None:
        _module("neuronxcc")
        _module("neuronxcc.nki")
        _module("neuronxcc.nki.language")
        _module("neuronxcc.nki.kernels")
        _module("neuronxcc.nki.kernels.attention", FlashConfig=_NeedsNeuronSDK)
        _module("neuronxcc.nki._private_kernels")
        _module("neuronxcc.nki._private_kernels.collectives", CollectivesConfig=_CollectivesConfig)
    absent = _NeedsNeuronSDK
    _module("neuronx_distributed.trace", ModelBuilder=absent, parallel_model_load=absent,
            parallel_model_save=absent, parallel_model_trace=absent)
    _module("neuronx_distributed.trace.model_builder_v2", ModelBuilder=absent)
    _module("neuronx_distributed.trace.functions", shard_checkpoint=absent)
    _module("neuronx_distributed.trace.nxd_model", BaseNxDModel=absent, NxDModel=absent,
            TorchScriptNxDModel=absent, convert_nxd_model_to_torchscript_model=absent)
    _module("neuronx_distributed.trace.parallel_context", NxDParallelState=absent)
    return True


def missing_packages() -> list[str]:
    """The pip packages neuron/ needs that this environment lacks (empty when all are there)."""
    needed = (("torch_xla", "torch-xla"), ("neuronx_distributed", "neuronx-distributed"))
    return [pip for module, pip in needed if importlib.util.find_spec(module) is None]


def import_nxd():
    """neuronx_distributed, importable with or without the Neuron SDK."""
    missing = missing_packages()
    if missing:
        raise ImportError(f"neuron/ needs {' and '.join(missing)}: on trn1 use the Neuron SDK venv; "
                          f"for CPU tests: pip install -r neuron/requirements-cpu-test.txt")
    os.environ.setdefault("PJRT_DEVICE", "CPU" if mode() != NEURON else "NEURON")
    _stand_in_for_neuron_sdk()
    import neuronx_distributed

    if not hasattr(torch, "xla"):
        # torch.utils.checkpoint looks up torch.<device type> for RNG states; torch-xla 2.7 registers
        # none, so checkpointed model code would fail on XLA. Without `_initialized` it skips them.
        torch._register_device_module("xla", types.ModuleType("torch.xla"))
    if mode() != NEURON:
        # NxD treats only PJRT_DEVICE=NEURON as PJRT; torch-xla's CPU client is one too (its checkpoint
        # code asks it for the local world size).
        import neuronx_distributed.parallel_layers.utils as nxd_utils

        nxd_utils.is_pjrt_device = lambda: True
    return neuronx_distributed


@dataclass
class World:
    mode: str
    rank: int
    world_size: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    device: torch.device


def init_distributed(tp: int, timeout_s: float | None = None) -> World:
    """Join the ranks (torchrun's environment, or a world of one) and build NxD's TP/DP groups."""
    nxd = import_nxd()
    from neuronx_distributed.parallel_layers import parallel_state as ps

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    world_size = int(os.environ["WORLD_SIZE"])
    run_mode = mode()
    if run_mode == XLA_CPU and world_size != 1:
        raise ValueError(f"WORLD_SIZE={world_size} on XLA:CPU: torch-xla's CPU device has no cross-process "
                         "collectives; use one process, or NXD_CPU_MODE=1 (gloo) for multi-rank CPU runs")
    if world_size % tp:
        raise ValueError(f"--tp {tp} does not divide the world size {world_size}")
    if not torch.distributed.is_initialized():
        import datetime

        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if run_mode == CPU:
            torch.distributed.init_process_group("gloo", **timeout)
        else:
            import torch_xla.distributed.xla_backend  # noqa: F401 - registers the xla backend

            torch.distributed.init_process_group("xla", init_method="xla://", **timeout)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    if run_mode == CPU:
        device = torch.device("cpu")
    else:
        import torch_xla.core.xla_model as xm

        device = xm.xla_device()
    del nxd
    return World(run_mode, torch.distributed.get_rank(), world_size, tp,
                 ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_size(),
                 ps.get_data_parallel_rank(), device)


def use_compile_cache(folder: str) -> None:
    """Compiled graphs are kept in `folder` and reused by later runs with the same graphs (a resumed
    or repeated run skips its compiles). XLA:CPU: torch-xla's persistent cache (one process, so one
    writer); Trainium: neuronx-cc's --cache_dir (as NEURON_CC_FLAGS); NXD_CPU_MODE compiles nothing.
    Call before the first XLA computation."""
    run_mode = mode()
    if run_mode == CPU:
        return
    os.makedirs(folder, exist_ok=True)
    if run_mode == NEURON:
        flags = os.environ.get("NEURON_CC_FLAGS", "")
        if "--cache_dir" not in flags:
            os.environ["NEURON_CC_FLAGS"] = f"{flags} --cache_dir={folder}".strip()
        return
    import torch_xla.runtime as xr

    xr.initialize_cache(folder, readonly=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mark_step() -> None:
    """Cut the XLA graph here (a no-op in gloo CPU mode)."""
    if mode() != CPU:
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def barrier(tag: str = "neuron barrier") -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    if mode() == CPU:
        torch.distributed.barrier()
    else:
        import torch_xla.core.xla_model as xm

        xm.rendezvous(tag)


def exit_with_parent() -> None:
    """Under torchrun: end this worker when its launcher ends, even by kill -9 (which gives the
    launcher no chance to stop its workers). Linux: the kernel's parent-death signal; elsewhere a
    thread that watches the parent process id."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # started by hand (nohup, a shell): outlive the shell
        return
    parent = os.getppid()
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError):
        import threading
        import time

        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the launcher ended before the signal was armed
        os._exit(1)


_LOG_HANDLERS: dict = {}


def log_to_file(path: str) -> None:
    """neuronx-distributed's INFO lines and Python warnings go to `path`, not the console. NxD gives
    each of its loggers its own stdout handler when first asked for it: those already made are
    redirected here, and those made later as they are made. Call again to sweep up stragglers."""
    import logging

    handler = _LOG_HANDLERS.get(path)
    if handler is None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler = _LOG_HANDLERS[path] = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s"))

    def redirect(logger: logging.Logger) -> logging.Logger:
        logger.handlers = [handler]
        logger.propagate = False
        return logger

    logging.captureWarnings(True)
    redirect(logging.getLogger("py.warnings"))
    import_nxd()
    import neuronx_distributed.utils.logger as nxd_logger

    if not getattr(nxd_logger.get_logger, "_to_file", False):
        original = nxd_logger.get_logger

        def get_logger(*args, **kwargs):
            return redirect(original(*args, **kwargs))

        get_logger._to_file = True
        nxd_logger.get_logger = get_logger
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.startswith(("neuronx_distributed", "torch_xla")):
            redirect(logger)
