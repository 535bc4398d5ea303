"""Corpus -> DataLayout MDS shards: ``python -m data.prepare --input ... --output DIR --seq-len N``.

The output folder holds ``train/`` (and ``val/`` unless the validation ratio is 0), each an
MDS dataset with one column ``words`` of DataLayout words plus ``layout.json``, and a
``summary.json`` with the counts printed at the end.

Inputs: text, JSONL, Parquet, saved or hub Hugging Face datasets, and (``--mode instruct``)
SQuAD v1.1 / v2.0 JSON files as published: each question becomes an example whose prompt is
``Context: PASSAGE\n\n`` followed by the template around the question, and whose target is the
first gold answer; unanswerable v2 questions are skipped unless ``--unanswerable TEXT``.

Reading and packing run in this process, in input order; tokenization runs in ``num_proc``
worker processes fed a bounded number of chunks, so memory stays flat for any corpus size.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.layout import ShardMeta, choose_layout
from data.packing import InstructPacker, PackStats, PretrainPacker
from data.shards import AtomicOutput, SplitWriter, check_upload_target, upload_folder
from data.sources import BadInputLog, Record, SquadOptions, find_sources, iter_records
from data.tokenizer import (
    init_worker,
    load_tokenizer,
    share_with_workers,
    tokenize_chunk,
    worker_tokenize_chunk,
)

MODES = ("pretrain", "instruct")
TEMPLATES = {
    "qa": "Question: {input}\nAnswer: ",
    "alpaca": "### Instruction:\n{input}\n\n### Response:\n",
    "plain": "{input}\n",
}
CONTEXT_PREFIX = "Context: {context}\n\n"  # before the templated question, for records with a passage
CHUNK_DOCS = 512  # documents per tokenization job
CHUNK_CHARS = 4 << 20  # ...or this many characters, whichever comes first


@dataclass
class PrepareSummary:
    output: str
    mode: str
    layout: str
    tokenizer: str
    vocab_size: int
    seq_len: int
    splits: dict[str, PackStats] = field(default_factory=dict)
    skipped_empty: int = 0
    skipped_bad: int = 0
    skipped_unanswerable: int = 0
    bad_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, stats in self.splits.items():
            out["splits"][name]["padding_fraction"] = stats.padding_fraction(self.seq_len)
        out["tokens_per_second"] = self.tokens_per_second
        return out

    def format(self) -> str:
        lines = [(f"wrote {self.output}  ({self.mode}, layout {self.layout}, tokenizer {self.tokenizer}, "
                  f"vocab {self.vocab_size}, seq_len {self.seq_len})")]
        for name, s in self.splits.items():
            lines.append(f"  {name:5s} documents {s.documents:,}  tokens {s.tokens:,}  rows {s.rows:,}  "
                         f"padding {s.padding_fraction(self.seq_len):.2%}  loss tokens {s.loss_tokens:,}")
            if s.too_long:
                lines.append(f"        skipped {s.too_long:,} examples longer than seq_len {self.seq_len}")
        if self.skipped_empty:
            lines.append(f"  skipped {self.skipped_empty:,} empty documents")
        if self.skipped_unanswerable:
            lines.append(f"  skipped {self.skipped_unanswerable:,} unanswerable SQuAD questions "
                         "(--unanswerable TEXT trains them with that answer)")
        if self.skipped_bad:
            lines.append(f"  skipped {self.skipped_bad:,} bad records, e.g. {self.bad_examples[0]}")
        lines.append(f"  time {self.seconds:.1f} s  ({self.tokens_per_second:,.0f} tokens/s)")
        return "\n".join(lines)


def resolve_template(template: str) -> str:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{input}" not in template:
        raise DataError(f"template {template!r} is neither a name ({', '.join(TEMPLATES)}) "
                        "nor a format string containing {input}")
    return template


def format_prompt(template: str, text: str, context: str | None = None) -> str:
    """A resolved ``template`` around ``text``; a passage (SQuAD's context) comes first.

    SQuAD with the ``qa`` template: ``Context: {context}\n\nQuestion: {question}\nAnswer: ``.
    """
    prompt = template.replace("{input}", text)
    return prompt if context is None else CONTEXT_PREFIX.replace("{context}", context) + prompt


def is_val_document(index: int, ratio: float) -> bool:
    """Deterministic, evenly spread choice (golden-ratio hashing); document 0 is always val."""
    return (index * 2654435761) % (1 << 32) < ratio * (1 << 32)


def prepare(
    inputs: Sequence[str],
    output: str,
    seq_len: int,
    *,
    mode: str = "pretrain",
    tokenizer: str = "byte",
    eos_token: str | None = None,
    text_field: str = "text",
    lines_as_docs: bool = False,
    val_ratio: float = 0.01,
    val_inputs: Sequence[str] | None = None,
    pack: bool = True,
    template: str = "qa",
    num_proc: int = 1,
    overwrite: bool = False,
    layout: str = "auto",
    compression: str | None = "zstd",
    shard_size: int = 1 << 26,
    skip_bad: bool = False,
    hf_split: str = "train",
    unanswerable: str | None = None,
    upload: str | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize, pack and write ``inputs`` as MDS shards under ``output``; see the module doc."""
    if mode not in MODES:
        raise DataError(f"mode {mode!r} must be one of {MODES}")
    if seq_len < 2:
        raise DataError(f"seq_len {seq_len} must be at least 2 (a label needs a next token)")
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"val_ratio {val_ratio} must be in [0, 1)")
    if num_proc < 1:
        raise DataError(f"num_proc {num_proc} must be at least 1")
    atomic_output = AtomicOutput(output, overwrite)  # refuses a non-empty output before any work
    prompt_format = resolve_template(template) if mode == "instruct" else ""
    sources = find_sources(inputs)
    val_sources = find_sources(val_inputs) if val_inputs else []
    tok = load_tokenizer(tokenizer, eos_token)
    data_layout = choose_layout(layout, tok.vocab_size, seq_len)
    if compression in ("none", ""):
        compression = None
    _check_compression(compression)  # imports streaming (seconds), so before the clock starts
    if upload:
        check_upload_target(upload)
    started = time.perf_counter()
    meta = ShardMeta(layout=data_layout.name, seq_len=seq_len, tokenizer=tok.name, vocab_size=tok.vocab_size,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, mode=mode)
    summary = PrepareSummary(output=str(Path(output).absolute()), mode=mode, layout=data_layout.name,
                             tokenizer=tok.name, vocab_size=tok.vocab_size, seq_len=seq_len)
    split_names = ["train"] + (["val"] if val_sources or val_ratio > 0 else [])
    bad = BadInputLog(skip_bad=skip_bad)
    squad = SquadOptions(unanswerable=unanswerable)
    read: dict[str, Any] = {"mode": mode, "text_field": text_field, "lines_as_docs": lines_as_docs,
                            "hf_split": hf_split, "bad": bad, "squad": squad}

    def non_empty(found: Iterator[Record]) -> Iterator[Record]:
        for record in found:
            if record == "":
                summary.skipped_empty += 1
            else:
                yield record

    def records() -> Iterator[tuple[str, Record]]:
        if val_sources:
            yield from (("train", r) for r in non_empty(iter_records(sources, **read)))
            yield from (("val", r) for r in non_empty(iter_records(val_sources, **read)))
            return
        for i, record in enumerate(non_empty(iter_records(sources, **read))):
            yield ("val" if val_ratio > 0 and is_val_document(i, val_ratio) else "train"), record

    def apply_template(record: Record) -> Record:
        if isinstance(record, tuple):
            context = record[2] if len(record) > 2 else None
            return format_prompt(prompt_format, record[0], context), record[1]
        return record

    with atomic_output as tmp:
        packers: dict[str, PretrainPacker | InstructPacker] = {}
        writers: dict[str, SplitWriter] = {}
        for name in split_names:
            packers[name] = (PretrainPacker(seq_len, tok.eos_token_id, tok.pad_token_id) if mode == "pretrain"
                             else InstructPacker(seq_len, tok.eos_token_id, tok.pad_token_id, pack))
            writers[name] = SplitWriter(tmp / name, data_layout, meta, compression, shard_size)
        try:
            chunks = _chunks((name, apply_template(r)) for name, r in records())
            for name, tokenized in _tokenize_all(chunks, (tok.name, eos_token), tok, num_proc, progress):
                writers[name].write(packers[name].add(tokenized))
            for name in split_names:
                writers[name].write(packers[name].finish())
                summary.splits[name] = packers[name].stats
                if packers[name].stats.rows == 0:
                    where = "the --val-input files" if name == "val" and val_sources else "the inputs"
                    raise DataError(f"split {name!r} is empty: {where} produced no rows "
                                    f"(all empty, skipped or longer than seq_len {seq_len})")
                writers[name].finish()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        summary.skipped_bad, summary.bad_examples = bad.count, bad.examples
        summary.skipped_unanswerable = squad.skipped
        summary.seconds = time.perf_counter() - started
        (tmp / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if upload:
        upload_folder(Path(summary.output), upload)
    summary.seconds = time.perf_counter() - started
    return summary


def _check_compression(compression: str | None) -> None:
    from streaming.base.compression import get_compressions

    if compression is not None and compression not in get_compressions():
        raise DataError(f"compression {compression!r} is not one of {sorted(get_compressions())} or 'none'")


def _chunks(records: Iterator[tuple[str, Record]]) -> Iterator[tuple[str, list[Record]]]:
    """Group records per split into tokenization jobs, keeping each split's order."""
    pending: dict[str, list[Record]] = {}
    chars: dict[str, int] = {}
    for name, record in records:
        bucket = pending.setdefault(name, [])
        bucket.append(record)
        size = len(record) if isinstance(record, str) else len(record[0]) + len(record[1])
        chars[name] = chars.get(name, 0) + size
        if len(bucket) >= CHUNK_DOCS or chars[name] >= CHUNK_CHARS:
            yield name, bucket
            pending[name], chars[name] = [], 0
    for name, bucket in pending.items():
        if bucket:
            yield name, bucket


def _tokenize_all(chunks: Iterator[tuple[str, list[Record]]], tokenizer_spec: tuple[str, str | None],
                  tok: Any, num_proc: int, progress: bool) -> Iterator[tuple[str, list[Any]]]:
    """Tokenize chunks in order, in ``num_proc`` processes with at most 2 jobs each in flight."""
    from tqdm import tqdm

    if num_proc == 1:
        with tqdm(unit=" docs", disable=not progress, file=sys.stderr, mininterval=1.0) as bar:
            for name, chunk in chunks:
                yield name, tokenize_chunk(tok, chunk)  # type: ignore[arg-type]
                bar.update(len(chunk))
        return
    # fork on Linux: workers inherit the loaded tokenizer, and it works from any script or
    # notebook (spawn must re-import __main__). The pool starts before tqdm's monitor thread
    # and before the shard writers' threads, and the parent has not run the tokenizer yet.
    share_with_workers(tok)
    pool = tokenizer_pool(num_proc, tokenizer_spec)
    finished = False
    try:
        with tqdm(unit=" docs", disable=not progress, file=sys.stderr, mininterval=1.0) as bar:
            in_flight: deque[tuple[str, int, Any]] = deque()
            for name, chunk in chunks:
                in_flight.append((name, len(chunk), pool.apply_async(worker_tokenize_chunk, (chunk,))))
                if len(in_flight) >= 2 * num_proc:
                    done_name, count, result = in_flight.popleft()
                    yield done_name, result.get()
                    bar.update(count)
            while in_flight:
                done_name, count, result = in_flight.popleft()
                yield done_name, result.get()
                bar.update(count)
        finished = True
    finally:
        if finished:  # the workers leave by themselves once the queue is closed: no signals
            pool.close()
        else:  # an error or an abandoned generator: stop them now
            pool.terminate()
        pool.join()


def tokenizer_pool(num_proc: int, tokenizer_spec: tuple[str, str | None]) -> Any:
    """The tokenizer workers: forked on Linux (the comment in _tokenize_all says why), each with
    SIGTERM and SIGINT back at their default actions. A forked worker inherits the parent's Python
    signal handlers, and Composer's (installed when composer.core is imported: a training, or a
    test, in the same process) answers SIGTERM with sys.exit, i.e. with Python code. Seen in a
    make test run: Pool.terminate() waited 300 s (test_parallel_tokenization_and_val_input) on a
    worker blocked on the task queue's lock while its sibling was already dead. With the default
    action a worker dies at the signal, wherever it is."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return context.Pool(num_proc, initializer=_init_tokenizer_worker, initargs=tokenizer_spec)


def _init_tokenizer_worker(*tokenizer_spec: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    init_worker(*tokenizer_spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize a corpus and write it as DataLayout MDS shards (train/, val/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text/JSONL/Parquet files or folders, a saved HF dataset folder, or hf:NAME")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (gets train/ and val/)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--mode", choices=MODES, default="pretrain")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte' (built in, offline), a HF name or folder, a SentencePiece .model file, "
                        "a tokenizer.json, or a folder holding one of these")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="the end-of-document token (or id), where the tokenizer names none or another")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/dataset field holding the text")
    p.add_argument("--lines-as-docs", action="store_true", help="text files: one document per line")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-ratio", type=float, default=0.01,
                       help="fraction of documents for val; 0 = no val split")
    split.add_argument("--val-input", nargs="+", metavar="PATH", help="val documents from these inputs")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="instruct: several examples per row (else one per row, padded)")
    p.add_argument("--template", default="qa", help=f"instruct prompt: {', '.join(TEMPLATES)} or a string "
                   "with {input}; the answer follows it. A SQuAD file's question is {input}, its passage "
                   "goes before: 'Context: PASSAGE\\n\\n'")
    p.add_argument("--unanswerable", metavar="TEXT",
                   help="SQuAD v2: train unanswerable questions with this answer (default: skip them)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--layout", choices=("auto", "int32", "int64"), default="auto")
    p.add_argument("--compression", default="zstd", help="shard compression, or 'none'")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="uncompressed bytes per shard")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset input")
    p.add_argument("--upload", metavar="URL", help="afterwards copy the output to s3://, gs://, oci://...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare(
            args.input, args.output, args.seq_len, mode=args.mode, tokenizer=args.tokenizer,
            eos_token=args.eos_token, unanswerable=args.unanswerable,
            text_field=args.text_field, lines_as_docs=args.lines_as_docs,
            val_ratio=0.0 if args.val_input else args.val_ratio, val_inputs=args.val_input, pack=args.pack,
            template=args.template, num_proc=args.num_proc, overwrite=args.overwrite, layout=args.layout,
            compression=args.compression, shard_size=args.shard_size, skip_bad=args.skip_bad,
            hf_split=args.hf_split, upload=args.upload, progress=not args.no_progress,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
