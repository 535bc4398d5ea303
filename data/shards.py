"""Write rows as MDS shards into a folder that appears only when everything succeeded."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

from data.errors import DataError
from data.layout import LAYOUT_FILENAME, DataLayout, ShardMeta
from data.packing import Rows

HASHES = ["sha1", "xxh64"]  # xxh64 is cheap to check on every read; sha1 for audits
INDEX_FILENAME = "index.json"


class AtomicOutput:
    """A temporary sibling folder, moved onto ``output`` on success and deleted on failure.

    A reader can never see a half-written dataset, and a failed run leaves no output folder
    (nor parent folders it had to create) behind.
    """

    def __init__(self, output: str | os.PathLike[str], overwrite: bool) -> None:
        self.output = Path(output).absolute()
        if self.output.exists():
            if not self.output.is_dir():
                raise DataError(f"output {self.output} exists and is not a folder")
            if any(self.output.iterdir()) and not overwrite:
                raise DataError(f"output {self.output} is not empty; pass --overwrite to replace it")
        self.overwrite = overwrite
        self._created_parent: Path | None = None
        self.tmp = self.output.parent / f".{self.output.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        missing = self.output.parent
        while not missing.parent.exists():
            missing = missing.parent
        if not missing.exists():
            self._created_parent = missing
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._commit()
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._created_parent is not None:
            shutil.rmtree(self._created_parent, ignore_errors=True)

    def _commit(self) -> None:
        old = None
        if self.output.exists():
            # Move the old folder aside first so that a crash now never loses both versions.
            old = self.output.parent / f".{self.output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, old)
        os.replace(self.tmp, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class SplitWriter:
    """One split folder: MDS shards of DataLayout words plus layout.json."""

    def __init__(self, folder: Path, layout: DataLayout, meta: ShardMeta, compression: str | None,
                 shard_size: int) -> None:
        from streaming import MDSWriter  # streaming is heavy; only writing needs it

        folder.mkdir(parents=True)
        self.folder, self.layout = folder, layout
        self._writer = MDSWriter(
            out=str(folder),
            columns={meta.column: f"ndarray:{layout.dtype_name}:{meta.seq_len}"},
            compression=compression,
            hashes=HASHES,
            size_limit=shard_size,
        )
        self._column = meta.column
        meta.save(folder)

    def write(self, rows: Rows | None) -> None:
        if rows is None:
            return
        words = self.layout.encode(rows.tokens, rows.positions, rows.loss)
        for row in words:
            self._writer.write({self._column: row})

    def finish(self) -> None:
        self._writer.finish()

    def abort(self) -> None:
        self._writer.cancel_future_jobs()


def check_upload_target(remote: str) -> None:
    """Reject an unsupported URL before hours of work, not after."""
    from streaming.base.storage.upload import UPLOADERS

    scheme = urlparse(remote).scheme
    if scheme not in UPLOADERS:
        known = ", ".join(f"{s}://" for s in sorted(UPLOADERS) if s and "/" not in s)
        raise DataError(f"cannot upload to {remote!r}: scheme {scheme!r} is not one of {known} or a folder")


def upload_folder(folder: Path, remote: str) -> None:
    """Copy a finished dataset to an object store (or another folder), index files last.

    Readers take a split to exist once its index.json does, so shards go up first.
    """
    from streaming.base.storage import CloudUploader

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    last = (LAYOUT_FILENAME, INDEX_FILENAME)
    files.sort(key=lambda name: (os.path.basename(name) in last, os.path.basename(name) == INDEX_FILENAME))
    if not urlparse(remote).scheme:  # a plain folder: the local uploader does not make subfolders
        for name in files:
            Path(remote, name).parent.mkdir(parents=True, exist_ok=True)
    try:
        uploader = CloudUploader.get(out=(str(folder), remote), keep_local=True, exist_ok=True)
    except ValueError as err:
        raise DataError(f"cannot upload to {remote!r}: {err}") from None
    for name in files:
        uploader.upload_file(name)
