"""PackedDataset and loaders over real shards: batches, shuffling, resumption, corruption, remote."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data import shm
from data.dataset import (
    CorruptShardError,
    PackedDataset,
    build_dataloader,
    load_shard_meta,
)
from data.errors import DataError
from data.layout import IGNORE_INDEX
from data.prepare import prepare

SEQ_LEN = 32


@pytest.fixture(scope="module", autouse=True)
def _fresh_shared_memory() -> None:
    # Only the segments of dead processes: streaming's clean_stale_shared_memory() would also delete
    # those of other jobs (or test runs) alive on this machine.
    with shm.machine_lock():
        shm.clean_dead_segments()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 100 train rows in several shards, plus a val split; each row is distinct."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghij "), size=7 + i % 50)) for i in range(150)]
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(source)], str(root / "out"), SEQ_LEN, val_ratio=0.05, shard_size=1 << 11, progress=False)
    return root / "out"


def sample_keys(samples: list[dict[str, np.ndarray]]) -> list[bytes]:
    return [s["input_ids"].tobytes() for s in samples]


def test_dataloader_batches(prepared: Path) -> None:
    loader = build_dataloader(str(prepared), split="train", batch_size=4, shuffle=False)
    batches = list(loader)
    dataset = loader.dataset
    assert isinstance(dataset, PackedDataset)
    assert dataset.layout.name == "int32" and dataset.seq_len == SEQ_LEN
    assert len(batches) == dataset.num_samples // 4  # drop_last
    batch = batches[0]
    assert set(batch) == {"input_ids", "labels", "seq_idx"}
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["seq_idx"].dtype == torch.int32 and batch["input_ids"].shape == (4, SEQ_LEN)
    first = dataset[0]
    assert torch.equal(batch["input_ids"][0], torch.from_numpy(first["input_ids"]))
    # labels are the next tokens wherever they are not -100
    ids, labels = batch["input_ids"], batch["labels"]
    keep = labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(labels[:, :-1][keep], ids[:, 1:][keep]) and (labels[:, -1] == IGNORE_INDEX).all()


def test_shuffle_is_deterministic_per_seed(prepared: Path) -> None:
    def order(seed: int) -> list[bytes]:
        return sample_keys(list(PackedDataset(str(prepared), split="train", shuffle=True, shuffle_seed=seed,
                                              batch_size=4)))

    plain = sample_keys(list(PackedDataset(str(prepared), split="train", shuffle=False, batch_size=4)))
    first, again, other = order(7), order(7), order(8)
    assert first == again
    assert first != other and first != plain
    assert sorted(first) == sorted(plain) == sorted(other)  # same rows, each exactly once
    assert len(set(plain)) == len(plain)


def test_resume_from_state_dict_yields_exactly_the_unseen_samples(prepared: Path) -> None:
    kwargs = {"split": "train", "shuffle": True, "shuffle_seed": 3, "batch_size": 4}
    first = PackedDataset(str(prepared), **kwargs)
    seen, full_order = [], []
    for i, sample in enumerate(first):
        full_order.append(sample["input_ids"].tobytes())
        if i < 12:
            seen.append(full_order[-1])
    state = first.state_dict(num_samples=12, from_beginning=True)
    assert state["sample_in_epoch"] == 12 and state["shuffle_seed"] == 3

    resumed = PackedDataset(str(prepared), **kwargs)
    resumed.load_state_dict(state)
    rest = sample_keys(list(resumed))
    assert rest == full_order[12:]
    assert not set(rest) & set(seen)


def test_two_workers_cover_the_epoch_once(prepared: Path) -> None:
    loader = build_dataloader(str(prepared), split="train", batch_size=2, shuffle=True, seed=5, num_workers=2,
                              drop_last=False)
    rows = [row.numpy().tobytes() for batch in loader for row in batch["input_ids"]]
    plain = sample_keys(list(PackedDataset(str(prepared), split="train", shuffle=False, batch_size=4)))
    assert sorted(rows) == sorted(plain)


def test_dataspec_counts_tokens(prepared: Path) -> None:
    from mamba.train import build_dataspec  # the Composer side lives in the recipe

    spec = build_dataspec(str(prepared), None, "val", batch_size=2, shuffle=False)
    batch = next(iter(spec.dataloader))
    assert spec.get_num_samples_in_batch(batch) == 2
    assert spec.get_num_tokens_in_batch(batch) == 2 * SEQ_LEN
    loss_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    assert 0 < loss_tokens < 2 * SEQ_LEN
    assert spec.get_num_tokens_in_batch(batch, token_type="loss_generating") == loss_tokens


def test_remote_with_local_cache_fetches_layout_and_shards(tmp_path: Path, prepared: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": f"remote doc {i} " * 3}) + "\n" for i in range(40)))
    remote = tmp_path / "bucket" / "ds"  # a folder stands in for s3://: same code path in streaming
    prepare([str(source)], str(tmp_path / "out"), SEQ_LEN, val_ratio=0, shard_size=1 << 10,
            upload=str(remote), progress=False)
    assert (remote / "train" / "layout.json").exists() and (remote / "train" / "index.json").exists()
    cache = tmp_path / "node-cache"
    dataset = PackedDataset(str(cache), str(remote), "train", shuffle=False, batch_size=4)
    [folder] = cache.iterdir()  # one folder per remote split, named after it
    assert folder.name.startswith("bucket_ds_train-")
    assert json.loads((folder / "source.json").read_text()) == {"remote": str(remote / "train")}
    assert (folder / "layout.json").exists() and dataset.meta.tokenizer == "byte"
    local = PackedDataset(str(tmp_path / "out"), None, "train", shuffle=False, batch_size=4)
    assert sample_keys(list(dataset)) == sample_keys(list(local))
    assert list(folder.glob("*.mds"))  # decompressed into the cache, not the remote
    assert not list(remote.glob("train/*.mds"))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_fails_naming_the_shard(tmp_path: Path) -> None:
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(60)))
    out = tmp_path / "out"
    remote = tmp_path / "remote"
    prepare([str(source)], str(out), SEQ_LEN, val_ratio=0, shard_size=1 << 10, upload=str(remote),
            progress=False)
    shards = sorted((out / "train").glob("shard.*.mds.zstd"))
    assert len(shards) >= 3
    corrupt(shards[1])
    corrupt(remote / "train" / shards[1].name)

    with pytest.raises(CorruptShardError, match=rf"{shards[1].name}.*Checksum failure"):
        # iteration: the shard is fetched by streaming's background thread
        list(PackedDataset(str(out), None, "train", shuffle=False, batch_size=2))
    with pytest.raises(CorruptShardError, match=rf"{shards[1].name}.*Checksum failure"):
        dataset = PackedDataset(str(out), None, "train", shuffle=False)
        [dataset[i] for i in range(dataset.num_samples)]  # random access: main thread
    with pytest.raises(CorruptShardError, match=rf"{shards[1].name} in {remote / 'train'}"):
        list(PackedDataset(str(tmp_path / "cache"), str(remote), "train", shuffle=False, batch_size=2))


def _iterate_within(dataset: PackedDataset, seconds: float) -> BaseException | None:
    """Iterate in a daemon thread; fail the test (not hang it) if iteration never ends."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            list(dataset)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"iteration over a corrupt shard still running after {seconds} s"
    return outcome[0]


class _SlowToSignal(PackedDataset):
    """Force the interleaving that used to hang: the download thread fails first, and the ready
    thread reaches the corrupt shard before streaming's failure event is set (it is set only after
    the failing thread's future completes), so it tries the shard itself and fails too."""

    def _ready_thread(self, it) -> None:  # noqa: ANN001 - streaming's signature
        time.sleep(0.1)
        super()._ready_thread(it)

    def on_exception(self, future) -> None:  # noqa: ANN001
        if future.exception() is not None:
            time.sleep(0.3)
        super().on_exception(future)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Shards whose first one is corrupt, both in the output folder and in an uploaded remote copy."""
    root = tmp_path_factory.mktemp("corrupt")
    source = root / "d.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(60)))
    prepare([str(source)], str(root / "out"), SEQ_LEN, val_ratio=0, shard_size=1 << 10,
            upload=str(root / "remote"), progress=False)
    name = sorted((root / "out" / "train").glob("shard.*.mds.zstd"))[0].name
    corrupt(root / "out" / "train" / name)
    corrupt(root / "remote" / "train" / name)
    return root / "out", root / "remote", name


def test_corrupt_shard_never_hangs_when_both_threads_fail(corrupt_shards: tuple[Path, Path, str],
                                                          tmp_path: Path) -> None:
    out, remote, name = corrupt_shards
    for i in range(3):
        dataset = _SlowToSignal(str(tmp_path / f"cache{i}"), str(remote), "train", shuffle=False,
                                batch_size=2)
        err = _iterate_within(dataset, 20)
        assert isinstance(err, CorruptShardError) and name in str(err), repr(err)


def test_corrupt_shard_fails_promptly_under_load(corrupt_shards: tuple[Path, Path, str],
                                                 tmp_path: Path) -> None:
    """Many runs of the corrupt-shard scenarios (local and remote) beside a competing busy process."""
    out, remote, name = corrupt_shards
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        for i in range(40):
            if i % 2:
                dataset = PackedDataset(str(out), None, "train", shuffle=i % 4 == 1, batch_size=2)
            else:
                dataset = PackedDataset(str(tmp_path / f"cache{i}"), str(remote), "train", shuffle=i % 4 == 0,
                                        batch_size=2)
            err = _iterate_within(dataset, 20)
            assert isinstance(err, CorruptShardError) and name in str(err), repr(err)
            # A later epoch of the same dataset names the shard again instead of a generic error.
            with pytest.raises(CorruptShardError, match=name):
                list(dataset)
    finally:
        busy.kill()
        busy.wait()


def test_missing_layout_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="layout.json not found"):
        load_shard_meta(str(tmp_path))
    with pytest.raises(DataError, match="cannot fetch layout.json"):
        load_shard_meta(str(tmp_path / "cache"), str(tmp_path / "no-such-remote"))


def test_corrupt_shard_through_loader_workers_and_resume(corrupt_shards: tuple[Path, Path, str]) -> None:
    """The training/eval paths: a DataLoader with a worker process, and a resumed position."""
    out, _, name = corrupt_shards
    loader = build_dataloader(str(out), None, "train", batch_size=2, shuffle=False, num_workers=1)
    with pytest.raises(CorruptShardError, match=name):
        list(loader)
    dataset = PackedDataset(str(out), None, "train", shuffle=False, batch_size=2)
    dataset.load_state_dict({"epoch": 0, "sample_in_epoch": 2, "num_canonical_nodes": 1, "shuffle_seed": 9176,
                             "initial_physical_nodes": None})
    err = _iterate_within(dataset, 20)
    assert isinstance(err, CorruptShardError) and name in str(err), repr(err)
