"""Read documents and instruction records from text, JSONL, Parquet and Hugging Face datasets.

Everything here yields plain Python strings lazily, so a corpus of hundreds of GB never sits
in memory. Bad input raises :class:`InputError` whose message starts with ``file:line`` (or
``file: row N`` for Parquet and datasets), or, with ``skip_bad``, is counted and skipped.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from data.errors import DataError

Record = str | tuple[str, str]  # a document's text, or (prompt input, answer)

HF_PREFIX = "hf:"  # "hf:NAME" loads a hub dataset by name (needs the network)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PROMPT_FIELDS = (("input", "output"), ("prompt", "response"))


class InputError(DataError):
    """Input the user must fix; the message names the file and line."""


@dataclass
class BadInputLog:
    """Counts records skipped with ``skip_bad`` and keeps the first few reasons."""

    skip_bad: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, message: str) -> None:
        if not self.skip_bad:
            raise InputError(message)
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


@dataclass(frozen=True)
class Source:
    kind: str  # "text" | "jsonl" | "parquet" | "hf_disk" | "hf_hub"
    path: str


def find_sources(paths: Iterable[str]) -> list[Source]:
    """Expand files and folders (recursively, sorted, hidden files skipped) into sources."""
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            if raw.startswith(HF_PREFIX):
                sources.append(Source("hf_hub", raw[len(HF_PREFIX):]))
                continue
            raise InputError(f"{raw}: input not found (a Hugging Face hub dataset is 'hf:NAME')")
        if path.is_dir():
            if any((path / marker).exists() for marker in HF_DISK_MARKERS):
                sources.append(Source("hf_disk", str(path)))
                continue
            found = [
                Source(_kind_of(f), str(f))
                for f in sorted(path.rglob("*"))
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            ]
            if not found:
                raise InputError(f"{raw}: folder holds no input files")
            sources.extend(found)
        else:
            sources.append(Source(_kind_of(path), str(path)))
    if not sources:
        raise InputError("no inputs given")
    return sources


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def iter_records(
    sources: Iterable[Source],
    *,
    mode: str,
    text_field: str = "text",
    lines_as_docs: bool = False,
    hf_split: str = "train",
    bad: BadInputLog | None = None,
) -> Iterator[Record]:
    """Yield documents (pretrain) or ``(input, output)`` pairs (instruct) from all sources."""
    bad = bad or BadInputLog()
    for source in sources:
        if source.kind == "text":
            if mode != "pretrain":
                raise InputError(f"{source.path}: instruction mode reads JSONL, Parquet or datasets")
            yield from _iter_text(source.path, lines_as_docs, bad)
        elif source.kind == "jsonl":
            yield from _iter_jsonl(source.path, mode, text_field, bad)
        elif source.kind == "parquet":
            rows = _parquet_rows(source.path, _wanted_columns(mode, text_field))
            yield from _iter_rows(source.path, rows, mode, text_field, bad)
        else:
            rows = _hf_rows(source, hf_split)
            yield from _iter_rows(source.path, rows, mode, text_field, bad)


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_text(path: str, lines_as_docs: bool, bad: BadInputLog) -> Iterator[str]:
    with _open_binary(path) as f:
        if not lines_as_docs:
            data = f.read()
            try:
                yield data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                line = data.count(b"\n", 0, err.start) + 1
                bad.report(f"{path}:{line}: undecodable bytes (not UTF-8) at byte {err.start}")
            return
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                bad.report(f"{path}:{number}: undecodable bytes (not UTF-8) at column {err.start + 1}")
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield text


def _iter_jsonl(path: str, mode: str, text_field: str, bad: BadInputLog) -> Iterator[Record]:
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                bad.report(f"{where}: undecodable bytes (not UTF-8) at column {err.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                hint = " (a JSON array? convert the file to JSON Lines)" if line.lstrip()[:1] == "[" else ""
                bad.report(f"{where}: invalid JSON: {err.msg} at column {err.colno}{hint}")
                continue
            record = _record_from(obj, mode, text_field, where, bad)
            if record is not None:
                yield record


def _record_from(obj: Any, mode: str, text_field: str, where: str, bad: BadInputLog) -> Record | None:
    if not isinstance(obj, dict):
        bad.report(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return None
    if mode == "pretrain":
        if text_field not in obj:
            fields = ", ".join(map(str, obj)) or "none"
            hint = "pick one with --text-field"
            bad.report(f"{where}: missing field {text_field!r} (fields: {fields}; {hint})")
            return None
        value = obj[text_field]
        if not isinstance(value, str):
            bad.report(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
            return None
        return value
    for prompt_key, answer_key in PROMPT_FIELDS:
        if prompt_key in obj and answer_key in obj:
            prompt, answer = obj[prompt_key], obj[answer_key]
            if not isinstance(prompt, str) or not isinstance(answer, str):
                bad.report(f"{where}: fields {prompt_key!r} and {answer_key!r} must be strings")
                return None
            return prompt, answer
    bad.report(f"{where}: missing field: need 'input' and 'output' (or 'prompt' and 'response'); "
               f"fields: {', '.join(map(str, obj)) or 'none'}")
    return None


def _iter_rows(path: str, rows: Iterator[dict[str, Any]], mode: str, text_field: str,
               bad: BadInputLog) -> Iterator[Record]:
    for number, row in enumerate(rows, start=1):
        record = _record_from(row, mode, text_field, f"{path}: row {number}", bad)
        if record is not None:
            yield record


def _wanted_columns(mode: str, text_field: str) -> list[tuple[str, ...]]:
    """Column sets that can feed a record, in order of preference."""
    return [(text_field,)] if mode == "pretrain" else list(PROMPT_FIELDS)


def _parquet_rows(path: str, wanted: list[tuple[str, ...]]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise InputError(f"{path}: cannot read Parquet: {err}") from None
    names = parquet.schema_arrow.names
    # Read only the needed columns: web-scale Parquet files often carry many more.
    columns = next((list(c) for c in wanted if all(n in names for n in c)), None)
    if columns is None:
        need = " or ".join(" and ".join(repr(n) for n in c) for c in wanted)
        raise InputError(f"{path}: needs column {need} (columns: {', '.join(names)})")
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        yield from batch.to_pylist()


def _hf_rows(source: Source, split: str) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{source.path}: Hugging Face datasets need `pip install datasets`") from None
    try:
        if source.kind == "hf_disk":
            loaded = datasets.load_from_disk(source.path)
        else:
            loaded = datasets.load_dataset(source.path, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - network, format and missing-file errors alike
        raise InputError(f"{source.path}: cannot load dataset: {type(err).__name__}: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            splits = ", ".join(loaded)
            raise InputError(f"{source.path}: no split {split!r} (splits: {splits}); use --hf-split")
        loaded = loaded[split]
    return iter(loaded)

