"""Lazy tensor sources, safe loading and a streaming safetensors writer.

Peak memory during a conversion is about one copy of the weights at most: sources are memory
mapped (safetensors, zip-format torch pickles) and the writer puts one tensor at a time to disk.
"""

from __future__ import annotations

import argparse
import json
import mmap
import struct
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mamba.model.config import MambaConfig

Getter = Callable[[], torch.Tensor]


class ConvertError(ValueError):
    """A user-facing problem with a source checkpoint, its config or the requested output."""


@dataclass
class Checkpoint:
    """A model in native form: config + {native name: zero-argument function giving the tensor}."""

    config: MambaConfig
    tensors: dict[str, Getter]
    source: str
    tokenizer_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


# ---------------------------------------------------------------- reading
def _numpy_globals() -> list:
    """Exactly the numpy objects a Megatron checkpoint pickles (rng state arrays and scalars)."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (multiarray.scalar, "numpy.core.multiarray.scalar")]
    if hasattr(np, "_core"):
        allowed += [multiarray._reconstruct, multiarray.scalar]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 pickles dtypes by class, e.g. numpy.dtypes.UInt32DType
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def megatron_globals() -> list:
    """Megatron pickles its argparse.Namespace and numpy rng state besides tensors."""
    return [argparse.Namespace, *_numpy_globals()]


def composer_globals() -> list:
    """Composer pickles numpy rng state, timedeltas (wall-clock time) and the torch version."""
    import datetime

    from torch.torch_version import TorchVersion

    return [datetime.timedelta, TorchVersion, *_numpy_globals()]


def _qualified(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def load_torch(path: Path, allowed: list | None = None, unsafe: bool = False) -> dict:
    """torch.load with weights_only=True, admitting exactly the `allowed` extra types;
    arbitrary unpickling only when `unsafe`. Memory mapped when possible."""
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    allowed = allowed or []
    context = torch.serialization.safe_globals(allowed) if allowed else nullcontext()
    try:
        with context:
            try:
                return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            found = ""
            try:
                ok = {_qualified(a) for a in allowed}
                names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                         if n not in ok]
                found = f" (it references {', '.join(names[:5])})"
            except Exception:
                pass
            raise ConvertError(f"{path}: holds Python objects beyond tensors and the allowed types"
                               f"{found}; refusing to unpickle them. Pass --unsafe-pickle only if "
                               f"you trust where the file came from") from None
        raise ConvertError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})") from None


class SafetensorsFiles:
    """One or more .safetensors files (a sharded `model.safetensors.index.json` too), memory mapped:
    tensors are zero-copy views of the file pages (copy-on-write), so nothing is read twice."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[mmap.mmap, dict]] = {}
        for path in files:
            mapped, header = _map_safetensors(path)
            for key, entry in header.items():
                if key != "__metadata__":
                    self.where[key] = (mapped, entry)

    def keys(self) -> list[str]:
        return list(self.where)

    def getter(self, key: str) -> Getter:
        def get() -> torch.Tensor:
            mapped, entry = self.where[key]
            start, end = entry["data_offsets"]
            dtype = _FROM_NAME[entry["dtype"]]
            if end == start:
                return torch.empty(entry["shape"], dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": it is CoW
                flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start,
                                        offset=entry["base"] + start)
            try:
                return flat.view(dtype).reshape(entry["shape"])
            except RuntimeError:  # data not aligned to the element size: copy this one tensor
                return flat.clone().view(dtype).reshape(entry["shape"])
        return get


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict]:
    """Validate the header and map the file; one-line ConvertError for anything else."""
    def bad(reason: str) -> ConvertError:
        return ConvertError(f"{path}: not a readable checkpoint ({reason})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise bad("header length is larger than the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data = size - 8 - n
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                start, end = entry["data_offsets"]
                if entry["dtype"] not in _FROM_NAME or not 0 <= start <= end <= data:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {key} lies outside the file: truncated?") from None
            entry["base"] = 8 + n
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    return mapped, header


def weight_source(folder: Path) -> tuple[list[str], Callable[[str], Getter], str]:
    """(keys, key -> getter, description) for the weights in a HF / state-spaces / native folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = SafetensorsFiles([folder / n for n in names])
        return files.keys(), files.getter, str(index)
    if (folder / "model.safetensors").is_file():
        files = SafetensorsFiles([folder / "model.safetensors"])
        return files.keys(), files.getter, str(folder / "model.safetensors")
    for name in ("pytorch_model.bin", "model.bin"):
        if (folder / name).is_file():
            state = load_torch(folder / name)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                      for v in state.values()):
                raise ConvertError(f"{folder / name}: not a state dict of tensors")
            return list(state), (lambda k, s=state: (lambda: s[k])), str(folder / name)
    raise ConvertError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                       f"pytorch_model.bin there")


def merge_split_in_proj(keys: list[str], get: Callable[[str], Getter]) -> dict[str, Getter]:
    """Trainium trainings keep Mamba-2's in_proj as in_proj_z, in_proj_xBC, in_proj_dt: rejoin."""
    out: dict[str, Getter] = {}
    parts = ("in_proj_z", "in_proj_xBC", "in_proj_dt")
    for key in keys:
        if ".in_proj_z." in key:
            pieces = [key.replace("in_proj_z", p) for p in parts]
            missing = [p for p in pieces if p not in keys]
            if missing:
                raise ConvertError(f"split in_proj is incomplete: {key} present but {missing[0]} "
                                   f"missing")
            out[key.replace("in_proj_z", "in_proj")] = (
                lambda ps=pieces: torch.cat([get(p)() for p in ps], dim=0))
        elif ".in_proj_xBC." in key or ".in_proj_dt." in key:
            continue
        else:
            out[key] = get(key)
    return out


# ---------------------------------------------------------------- checking
def expected_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Native names -> shapes for a config, from a model built on the meta device (no memory)."""
    from mamba.model import MambaLMHeadModel

    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def shape_error(config: MambaConfig, source: str, missing: list[str], unexpected: list[str],
                wrong: list[str]) -> ConvertError:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {', '.join(items[:5])}{more}")
    layers = "".join(config.layer_kinds())
    return ConvertError(f"{source} does not match the config (d_model={config.d_model}, "
                        f"n_layer={config.n_layer}, layers={layers}, "
                        f"vocab={config.padded_vocab_size}): " + "; ".join(parts))


def check_names(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Drop a tied lm_head; raise on missing or unexpected names. Returns the expected shapes."""
    expected = expected_shapes(ckpt.config)
    if ckpt.config.tie_embeddings:
        ckpt.tensors.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in ckpt.tensors]
    unexpected = [k for k in ckpt.tensors if k not in expected]
    if missing or unexpected:
        raise shape_error(ckpt.config, ckpt.source, missing, unexpected, [])
    return expected


def stream_tensors(ckpt: Checkpoint, dtype: torch.dtype | None = None
                   ) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) in model order, each checked against its expected shape; raises at the end
    with every mis-shaped tensor listed (the caller writes into a temp folder, so nothing remains)."""
    expected = check_names(ckpt)
    wrong = []
    for name, shape in expected.items():
        tensor = ckpt.tensors[name]()
        if tuple(tensor.shape) != shape:
            wrong.append(f"{name}: expected {shape}, found {tuple(tensor.shape)}")
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor
    if wrong:
        raise shape_error(ckpt.config, ckpt.source, [], [], wrong)


# ---------------------------------------------------------------- writing


def write_safetensors(path: Path, items: Iterable[tuple[str, torch.Tensor]],
                      names_and_shapes: dict[str, tuple[int, ...]], metadata: dict | None = None
                      ) -> None:
    """Write tensors one at a time. The header is written last into space reserved up front
    (sized for the longest dtype and offsets), padded with spaces as the format allows."""
    def header(entries: dict) -> bytes:
        body = dict(entries)
        if metadata:
            body["__metadata__"] = metadata
        return json.dumps(body, separators=(",", ":")).encode()

    big = 10 ** 19
    reserve = len(header({k: {"dtype": "BOOL", "shape": list(s), "data_offsets": [big, big]}
                          for k, s in names_and_shapes.items()}))
    reserve += (-reserve) % 8
    entries, offset = {}, 0
    with open(path, "wb") as f:
        f.seek(8 + reserve)
        for name, tensor in items:
            tensor = tensor.detach().contiguous().cpu()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + data.nbytes]}
            offset += data.nbytes
            del tensor, data
        raw = header(entries)
        if len(raw) > reserve:  # a name outside names_and_shapes; cannot happen via stream_tensors
            raise ConvertError(f"{path}: safetensors header larger than reserved")
        f.seek(0)
        f.write(struct.pack("<Q", reserve) + raw + b" " * (reserve - len(raw)))
