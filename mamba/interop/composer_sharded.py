"""Composer sharded checkpoints (torch.distributed.checkpoint folders: `.metadata` + `*.distcp`).

DCP unpickles `.metadata` with plain pickle; we read it with an unpickler that admits only DCP's
own metadata classes, torch.Size and dtypes. Tensor data is read by DCP with weights_only=True.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from mamba.interop.tensors import ConvertError

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self):
            with open(folder / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def read_sharded_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """{name under state['model']: full tensor} from a Composer sharded checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    reader = _reader(folder)
    try:
        metadata = reader.read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise ConvertError(f"{folder / '.metadata'}: not readable checkpoint metadata "
                           f"({type(exc).__name__}: {exc})") from None
    prefix = "state.model."
    wanted = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith(prefix) and hasattr(meta, "size"):
            wanted[fqn[len(prefix):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not wanted:
        raise ConvertError(f"{folder}: no state.model tensors; not a Composer sharded checkpoint")
    nested = {"state": {"model": wanted}}
    try:
        with warnings.catch_warnings():  # DCP's own deprecation chatter (TypedStorage, no_dist)
            warnings.simplefilter("ignore")
            dcp.load(nested, storage_reader=reader, no_dist=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConvertError(f"{folder}: could not read the shards ({type(exc).__name__}: "
                           f"{first[:300]})") from None
    return nested["state"]["model"]
