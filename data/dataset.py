"""Stream DataLayout shards as model batches: ``input_ids``, ``labels``, ``seq_idx``.

``local`` is the per-node cache (or the data itself when ``remote`` is None); ``remote`` is
where the shards live: s3://, gs://, oci://..., or a shared folder. Shuffling, multi-node
partitioning (``num_canonical_nodes``) and mid-epoch resumption (``state_dict`` /
``load_state_dict``, which Composer calls for us) come from mosaicml-streaming.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.storage import CloudDownloader
from torch.utils.data import DataLoader

from data.errors import DataError
from data.layout import IGNORE_INDEX, LAYOUT_FILENAME, ShardMeta, decode_row

BATCH_KEYS = ("input_ids", "labels", "seq_idx")


class CorruptShardError(RuntimeError):
    """A shard failed hash validation (or could not be fetched); the message names it."""


def split_paths(local: str, remote: str | None, split: str | None) -> tuple[str, str | None]:
    if not split:
        return local, remote
    return os.path.join(local, split), (os.path.join(remote, split) if remote else None)


def load_shard_meta(local_dir: str, remote_dir: str | None = None, timeout: float = 60.0) -> ShardMeta:
    """Read a split's layout.json, fetching it into the local cache first when it is remote."""
    path = os.path.join(local_dir, LAYOUT_FILENAME)
    if not os.path.exists(path):
        if remote_dir is None:
            raise DataError(f"{path} not found: is {local_dir} a split folder written by data.prepare?")
        os.makedirs(local_dir, exist_ok=True)
        # Every rank may fetch at once; a private temporary name and an atomic rename keep that safe.
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            CloudDownloader.direct_download(os.path.join(remote_dir, LAYOUT_FILENAME), tmp, timeout)
        except Exception as err:  # noqa: BLE001 - each object store raises its own kinds
            raise DataError(f"cannot fetch {LAYOUT_FILENAME} from {remote_dir}: {err}") from None
        os.replace(tmp, path)
    return ShardMeta.load(path)


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
        self.meta = load_shard_meta(local_dir, remote_dir, download_timeout)
        self.layout = self.meta.data_layout
        self.seq_len = self.meta.seq_len
        super().__init__(
            local=local_dir, remote=remote_dir, shuffle=shuffle, shuffle_seed=shuffle_seed,
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
