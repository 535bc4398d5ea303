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
from typing import IO, Any, NamedTuple

from data.errors import DataError

Record = str | tuple[str, str]  # a document's text, or (prompt input, answer), or an Example

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


class Example(NamedTuple):
    """An instruction record whose prompt shows a passage before the question (SQuAD)."""

    input: str
    output: str
    context: str


@dataclass
class SquadOptions:
    """What instruct mode does with SQuAD v2 questions that have no answer in their passage."""

    unanswerable: str | None = None  # the answer to train them with; None skips them
    skipped: int = 0


@dataclass(frozen=True)
class Source:
    kind: str  # "text" | "jsonl" | "parquet" | "hf_disk" | "hf_hub"
    path: str


def describe_json_error(err: json.JSONDecodeError) -> str:
    """``invalid JSON: <what> at column N``; the caller names the file and line (``err.lineno``)."""
    what = err.msg.removesuffix(" at")  # json's messages for strings already end in "at"
    return f"invalid JSON: {what} at column {err.colno}"


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
    squad: SquadOptions | None = None,
) -> Iterator[Record]:
    """Yield documents (pretrain) or ``(input, output)`` pairs (instruct) from all sources.

    A ``.json`` file in the SQuAD format yields an :class:`Example` per question (see
    :func:`load_squad`); ``squad`` says what becomes of unanswerable ones and counts skips.
    """
    bad = bad or BadInputLog()
    squad = squad or SquadOptions()
    for source in sources:
        if source.kind == "text":
            if mode != "pretrain":
                raise InputError(f"{source.path}: instruction mode reads JSONL, Parquet or datasets")
            yield from _iter_text(source.path, lines_as_docs, bad)
        elif source.kind == "jsonl":
            document = load_squad(source.path)
            if document is not None:
                yield from _squad_examples(source.path, document, mode, squad, bad)
            else:
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
                obj = json.loads(line.rstrip("\r\n"))  # an unclosed string is reported as such
            except json.JSONDecodeError as err:
                hint = " (a JSON array? convert the file to JSON Lines)" if line.lstrip()[:1] == "[" else ""
                bad.report(f"{where}: {describe_json_error(err)}{hint}")
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



# --- SQuAD v1.1 / v2.0: one JSON document, data -> paragraphs -> qas -------------------------
@dataclass(frozen=True)
class SquadQuestion:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold answer texts (dev sets have several per question)
    impossible: bool  # v2.0 ``is_impossible``: the passage holds no answer


def is_squad(obj: Any) -> bool:
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        return False
    return (isinstance(data[0], dict) and "paragraphs" in data[0]) if data else "version" in obj


def load_squad(path: str | Path) -> dict[str, Any] | None:
    """The parsed file if ``path`` is a SQuAD-format JSON document, else None (JSON Lines).

    The official files hold the whole document on one line; a pretty-printed one (first line
    ``{``) is read whole too. Any other multi-line JSON document is an error.
    """
    path = str(path)
    with _open_binary(path) as f:
        first = f.readline()
        if first.strip() not in (b"{", b"\xef\xbb\xbf{"):
            try:
                obj = json.loads(first.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return None  # the JSON Lines reader reports it
            return obj if is_squad(obj) else None
        raw = first + f.read()
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: undecodable bytes (not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: {describe_json_error(err)}") from None
    if not is_squad(obj):
        raise InputError(f"{path}: one JSON document over several lines: give JSON Lines (one object per "
                         "line) or a SQuAD file (data -> paragraphs -> qas)")
    return obj


def iter_squad(path: str | Path, document: dict[str, Any], bad: BadInputLog) -> Iterator[SquadQuestion]:
    """Every question of a SQuAD document; a malformed entry is reported by its place in the file."""
    for a, article in enumerate(document["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            bad.report(f"{path}: data[{a}]: needs 'paragraphs' (a list)")
            continue
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(qas, list):
                bad.report(f"{where}: needs 'context' (a string) and 'qas' (a list)")
                continue
            for q, qa in enumerate(qas):
                question = _squad_question(qa, context, f"{where}.qas[{q}]", bad)
                if question is not None:
                    yield question


def _squad_question(qa: Any, context: str, where: str, bad: BadInputLog) -> SquadQuestion | None:
    qa = qa if isinstance(qa, dict) else {}
    question, answers = qa.get("question"), qa.get("answers", [])
    if (not isinstance(question, str) or not isinstance(answers, list)
            or not all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers)):
        bad.report(f"{where}: needs 'question' (a string) and 'answers' (a list of {{text, answer_start}})")
        return None
    impossible = bool(qa.get("is_impossible", False))
    if not answers and not impossible:
        bad.report(f"{where}: no answers, and not marked is_impossible")
        return None
    where_id = qa.get("id", where.rsplit(": ", 1)[-1])
    return SquadQuestion(str(where_id), context, question, tuple(x["text"] for x in answers), impossible)


def _squad_examples(path: str, document: dict[str, Any], mode: str, squad: SquadOptions,
                    bad: BadInputLog) -> Iterator[Record]:
    if mode != "instruct":
        raise InputError(f"{path}: a SQuAD file holds questions and answers: use --mode instruct")
    for q in iter_squad(path, document, bad):
        if q.impossible and squad.unanswerable is None:
            squad.skipped += 1
            continue
        yield Example(q.question, squad.unanswerable if q.impossible else q.answers[0], q.context)
