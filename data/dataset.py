"""Stream DataLayout shards as model batches: ``input_ids``, ``labels``, ``seq_idx``.

``local`` is the data itself when ``remote`` is None; with a ``remote`` (s3://, gs://, oci://...,
or a shared folder) it is a cache root, and each remote split gets its own folder in it, named
after the remote and its index.json (``<bucket_path_split>-<hash>/``, with ``source.json``), so
jobs sharing one cache never read each other's shards. Shuffling, multi-node partitioning
(``num_canonical_nodes``) and mid-epoch resumption (``state_dict`` / ``load_state_dict``, which
Composer calls for us) come from mosaicml-streaming.

Several readers at once: nodes sharing one folder fetch and decompress shards safely
(:class:`SharedCacheStream`), and jobs starting together on one machine get distinct shared
memory, with the segments of killed processes cleaned (``data/shm.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.compression import decompress
from streaming.base.format.base.reader import FileInfo
from streaming.base.hashing import get_hash
from streaming.base.storage import CloudDownloader
from torch.utils.data import DataLoader

from data import shm
from data.errors import DataError
from data.layout import IGNORE_INDEX, LAYOUT_FILENAME, ShardMeta, decode_row

BATCH_KEYS = ("input_ids", "labels", "seq_idx")
INDEX_FILENAME = "index.json"
SOURCE_FILENAME = "source.json"

shm.install()  # several jobs on one machine: see data/shm.py


class CorruptShardError(RuntimeError):
    """A shard failed hash validation (or could not be fetched); the message names it."""


def split_paths(local: str, remote: str | None, split: str | None) -> tuple[str, str | None]:
    if not split:
        return local, remote
    return os.path.join(local, split), (os.path.join(remote, split) if remote else None)


def _private_name(path: str) -> str:
    """A temporary name no other process (rank, node, job) writing ``path`` at the same time uses."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _fetch(remote_dir: str, name: str, path: str, timeout: float) -> None:
    """Download ``remote_dir/name`` to ``path``; every rank may fetch at once, so through a private
    temporary name and an atomic rename."""
    tmp = _private_name(path)
    try:
        CloudDownloader.direct_download(os.path.join(remote_dir, name), tmp, timeout)
    except Exception as err:  # noqa: BLE001 - each object store raises its own kinds
        raise DataError(f"cannot fetch {name} from {remote_dir}: {err}") from None
    os.replace(tmp, path)


def load_shard_meta(local_dir: str, remote_dir: str | None = None, timeout: float = 60.0) -> ShardMeta:
    """Read a split's layout.json, fetching it into the local cache first when it is remote."""
    path = os.path.join(local_dir, LAYOUT_FILENAME)
    if not os.path.exists(path):
        if remote_dir is None:
            raise DataError(f"{path} not found: is {local_dir} a split folder written by data.prepare?")
        os.makedirs(local_dir, exist_ok=True)
        _fetch(remote_dir, LAYOUT_FILENAME, path, timeout)
    return ShardMeta.load(path)


def cache_folder(local: str, remote_dir: str, index: bytes) -> str:
    """The cache folder of one remote split: named after the remote and its index.json, so that a
    cache shared by jobs (or by runs before and after the remote was rewritten) never serves one
    dataset's shards for another."""
    remote_dir = remote_dir.rstrip("/")
    digest = hashlib.sha256(remote_dir.encode() + b"\0" + index).hexdigest()[:16]
    tail = "_".join(remote_dir.split("://")[-1].split("/")[-3:])  # e.g. bucket_corpus_train
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("_")[-48:]
    return os.path.join(local, f"{readable}-{digest}")


def prepare_cache(local: str, remote_dir: str, timeout: float = 60.0) -> str:
    """Fetch the remote split's index.json and return its cache folder under ``local``, with that
    index in place (streaming then takes it as is) and ``source.json`` naming the remote."""
    os.makedirs(local, exist_ok=True)
    fetched = _private_name(os.path.join(local, INDEX_FILENAME))
    _fetch(remote_dir, INDEX_FILENAME, fetched, timeout)
    try:
        with open(fetched, "rb") as f:
            index = f.read()
        folder = cache_folder(local, remote_dir, index)
        os.makedirs(folder, exist_ok=True)
        cached = os.path.join(folder, INDEX_FILENAME)
        if os.path.exists(cached):
            with open(cached, "rb") as f:
                if f.read() != index:
                    raise DataError(f"{cached} differs from {remote_dir}/{INDEX_FILENAME}: the cache "
                                    f"folder was changed by hand; delete {folder}")
        else:
            os.replace(fetched, cached)
        source = os.path.join(folder, SOURCE_FILENAME)
        if not os.path.exists(source):
            tmp = _private_name(source)
            with open(tmp, "w") as f:
                json.dump({"remote": remote_dir}, f)
            os.replace(tmp, source)
    finally:
        if os.path.exists(fetched):
            os.remove(fetched)
    return folder


class SharedCacheStream(Stream):
    """A Stream whose files appear in the local folder only whole and under their final names, however
    many processes fetch or decompress the same shard at once.

    streaming coordinates the ranks of one job on one machine through shared memory; processes that
    do not share it (nodes reading one shared folder, separate jobs) all fetch or decompress a
    missing shard. streaming writes ``shard.mds.tmp`` and renames it: the second writer truncates
    the first one's file, and its own rename then fails (``FileNotFoundError``). Here every writer
    has a private temporary name and an atomic rename; identical bytes land either way.
    """

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        final = os.path.join(self.local, self.split, to_basename or from_basename)
        if os.path.exists(final):
            return final
        private = os.path.basename(_private_name(final))
        os.replace(super()._download_file(from_basename, private), final)
        return final

    def _decompress_shard_part(self, zip_info: FileInfo, zip_filename: str, raw_filename: str,
                               compression: str | None) -> None:
        try:
            with open(zip_filename, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if os.path.isfile(raw_filename):  # another process decompressed it and dropped the zip
                return
            raise
        if self.validate_hash:
            if self.validate_hash not in zip_info.hashes:
                raise ValueError(f"Hash algorithm `{self.validate_hash}` chosen for data validation is "
                                 f"not among the dataset's {sorted(zip_info.hashes)}. Provide one of those.")
            if get_hash(self.validate_hash, data) != zip_info.hashes[self.validate_hash]:
                raise ValueError(f"Checksum failure: {zip_filename}")
        tmp = _private_name(raw_filename)
        with open(tmp, "wb") as out:
            out.write(decompress(compression, data))  # type: ignore[arg-type]
        os.replace(tmp, raw_filename)
        if not self.safe_keep_zip:
            try:
                os.remove(zip_filename)
            except FileNotFoundError:
                pass


class PackedDataset(StreamingDataset):
    """A StreamingDataset of packed rows that decodes DataLayout words into model inputs.

    The layout comes from the split's layout.json, never from guessing. Shards are hash
    checked (``validate_hash``, xxh64 by default) whenever they are fetched or decompressed.
    """

    def __init__(
        self,
        local: str,
        remote: str | None = None,
        split: str | None = "train",
        *,
        shuffle: bool = False,
        shuffle_seed: int = 9176,
        batch_size: int | None = None,
        num_canonical_nodes: int | None = None,
        predownload: int | None = None,
        cache_limit: int | str | None = None,
        validate_hash: str | None = "xxh64",
        download_timeout: float = 60.0,
        **streaming_kwargs: Any,
    ) -> None:
        local_dir, remote_dir = split_paths(local, remote, split)
        if remote_dir is not None:
            local_dir = prepare_cache(local, remote_dir, download_timeout)
        self.meta = load_shard_meta(local_dir, remote_dir, download_timeout)
        self.layout = self.meta.data_layout
        self.seq_len = self.meta.seq_len
        super().__init__(
            streams=[SharedCacheStream(remote=remote_dir, local=local_dir)], shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            batch_size=batch_size, num_canonical_nodes=num_canonical_nodes, predownload=predownload,
            cache_limit=cache_limit, validate_hash=validate_hash, download_timeout=download_timeout,
            **streaming_kwargs,
        )
        self._shard_error: CorruptShardError | None = None

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        words = super().get_item(sample_id, retry)[self.meta.column]
        return decode_row(words, self.layout)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        before = int(self._shard_states[shard_id])
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            # Let a later attempt (or another worker) fail on its own instead of waiting forever
            # on a shard stuck in the "preparing" state.
            self._shard_states[shard_id] = before
            names = ", ".join(raw.basename if zip_ is None else zip_.basename
                              for raw, zip_ in self.shards[shard_id].file_pairs)
            stream = self.streams[self.stream_per_shard[shard_id]]
            error = CorruptShardError(f"{names} in {stream.remote or stream.local}: {err}")
            self._shard_error = error
            raise error from err

    # streaming counts the exits of its download ("prepare") and ready threads before an
    # iteration may end (``_Iterator.exit``); a thread that dies on an exception never reports, and
    # the main thread then polls forever. Both threads can die on a corrupt shard (the ready thread
    # re-prepares a shard whose state we reset), so each reports its exit however it ends.
    def _prepare_thread(self, it: Any) -> None:
        _reporting_exit(super()._prepare_thread, it)

    def _ready_thread(self, it: Any) -> None:
        _reporting_exit(super()._ready_thread, it)

    def __iter__(self) -> Any:
        failed = getattr(self, "_event", None) is not None and self._event.is_set()
        if failed and self._shard_error is not None:
            raise self._shard_error  # a later epoch of a dataset whose shard was found corrupt
        self._shard_error = None
        try:
            yield from super().__iter__()
        except Exception as err:
            # The main thread may meet streaming's generic "Background thread failed" first.
            if self._shard_error is not None and err is not self._shard_error:
                raise self._shard_error from err
            raise
        # streaming's download thread ends the epoch early, silently, when a shard fails.
        if self._shard_error is not None:
            raise self._shard_error


def _reporting_exit(thread_body: Any, it: Any) -> None:
    """Run one of streaming's iteration threads; if it dies on an exception, still count its exit."""
    try:
        thread_body(it)
    except BaseException:
        it.on_exit()
        raise


def collate_packed(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into ``input_ids`` int64, ``labels`` int64, ``seq_idx`` int32, all [B, L]."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in BATCH_KEYS}


def build_dataloader(
    local: str,
    remote: str | None = None,
    split: str | None = "train",
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 9176,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    num_canonical_nodes: int | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader over :class:`PackedDataset`; ``batch_size`` is per device.

    The same ``batch_size`` goes to the dataset so that the sample order is deterministic
    and resumable for any number of workers.
    """
    dataset = PackedDataset(local, remote, split, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                            num_canonical_nodes=num_canonical_nodes, **dataset_kwargs)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_packed,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def count_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Composer's token counts: ``total`` = every position of the batch (padding included),
    ``loss_generating`` = positions with a label (not -100), used to weight microbatches."""
    return {
        "total": int(batch["input_ids"].numel()),
        "loss_generating": int((batch["labels"] != IGNORE_INDEX).sum()),
    }


def count_samples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])
