"""Score a saved model: ``python -m mamba.evaluate {qa,perplexity} MODEL_DIR ...``.

``qa``: generate an answer for every record of a test JSONL ({input, output}, also {prompt,
response}; ``answers`` or a list-valued ``output`` gives several references), write the
predictions as JSONL ({input, pred, label, exact_match, f1, rouge_l}) and the means as a
JSON score file: exact match, token F1 (SQuAD normalisation, best reference) and ROUGE-L,
each x100. Prompts use data.prepare's instruct template (``--template``, default ``qa``),
the format a ``--mode instruct`` fine-tune was trained on.

``perplexity``: mean cross entropy over the labelled tokens of an MDS split written by
data.prepare (answer tokens only for instruct shards), and its exponential.

A user mistake prints one line ``error: ...`` (a bad JSONL line as ``error: FILE:LINE: ...``)
and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.errors import DataError
from mamba.generate import (
    SamplingOptions,
    UsageError,
    add_model_arguments,
    add_sampling_arguments,
    apply_template,
    check_model_folder,
    cut_at_stop,
    generate_texts,
    iter_jsonl,
    load_model,
    load_tokenizer_for,
    pick_field,
    run_cli,
    sampling_options,
)
from mamba.qa_metrics import exact_match, rouge_l, score_all, token_f1

INPUT_KEYS = ("input", "prompt")
REFERENCE_KEYS = ("answers", "output", "response")


@dataclass
class QARecord:
    input: str
    references: list[str]
    label: str | list[str]  # as written in the file, echoed into the predictions


def read_qa_records(path: str | Path, limit: int | None = None) -> list[QARecord]:
    """Every record checked (a bad line anywhere is an error), the first ``limit`` kept."""
    records = []
    for where, obj in iter_jsonl(path):
        question = pick_field(obj, INPUT_KEYS, where)
        key = next((k for k in REFERENCE_KEYS if k in obj), None)
        if key is None:
            raise UsageError(f"{where}: missing field: need one of {', '.join(map(repr, REFERENCE_KEYS))} "
                             f"(the reference answer); fields: {', '.join(map(str, obj)) or 'none'}")
        value = obj[key]
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UsageError(f"{where}: field {key!r} must be a string or a non-empty list of strings")
        records.append(QARecord(question, list(refs), value))
    if not records:
        raise UsageError(f"{path}: no records")
    return records[:limit] if limit else records


def evaluate_qa(model, tok, records: Sequence[QARecord], options: SamplingOptions, *,
                template: str | None = "qa", batch_size: int = 16,
                stops: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(prediction rows, scores x100) for ``records``."""
    prompts = [apply_template(template, r.input) for r in records]
    preds = [cut_at_stop(p, stops).strip() for p in generate_texts(model, tok, prompts, options, batch_size)]
    rows = [{"input": r.input, "pred": p, "label": r.label,
             "exact_match": exact_match(p, r.references), "f1": token_f1(p, r.references),
             "rouge_l": rouge_l(p, r.references)}
            for r, p in zip(records, preds, strict=True)]
    return rows, score_all(preds, [r.references for r in records])


@torch.inference_mode()
def evaluate_perplexity(model, local: str, split: str | None = "val", batch_size: int = 8,
                        max_batches: int | None = None) -> dict[str, float]:
    """Token-mean cross entropy over labelled positions (label != -100) and its exp."""
    from data.dataset import build_dataloader

    loader = build_dataloader(local, None, split, batch_size=batch_size, shuffle=False, drop_last=False)
    if loader.dataset.meta.vocab_size > model.config.vocab_size:
        raise UsageError(f"the shards' tokenizer has {loader.dataset.meta.vocab_size} tokens but the "
                         f"model only {model.config.vocab_size}")
    device = model.backbone.embedding.weight.device
    total, count, batches = 0.0, 0, 0
    for batch in loader:
        if max_batches is not None and batches >= max_batches:
            break
        logits = model(batch["input_ids"].to(device), seq_idx=batch["seq_idx"].to(device))
        logits = logits[..., :model.config.vocab_size].float()
        labels = batch["labels"].to(device)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         labels.reshape(-1), ignore_index=-100,
                                                         reduction="sum"))
        count += int((labels != -100).sum())
        batches += 1
    if count == 0:
        raise UsageError(f"{local}/{split}: no labelled tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "batches": batches}


# ---- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    qa = sub.add_parser("qa", help="generate answers for a test JSONL; exact match, F1, ROUGE-L",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(qa)
    qa.add_argument("--data", required=True, metavar="FILE", help="test JSONL {input, output}")
    qa.add_argument("--template", default="qa", help="data.prepare instruct template (name or string)")
    qa.add_argument("--limit", type=int, default=None, help="score only the first N records")
    qa.add_argument("--predictions", metavar="FILE",
                    help="predictions JSONL (default: OUT/predictions.jsonl)")
    qa.add_argument("--scores", metavar="FILE", help="scores JSON (default: OUT/scores.json)")
    qa.add_argument("--out", default=None, metavar="DIR", help="folder for both (default: MODEL/eval)")
    add_sampling_arguments(qa, max_new_tokens=32)
    ppl = sub.add_parser("perplexity", help="mean loss and perplexity over an MDS split",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(ppl)
    ppl.add_argument("--data", required=True, metavar="DIR", help="a data.prepare output folder")
    ppl.add_argument("--split", default="val")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None)
    ppl.add_argument("--scores", metavar="FILE", help="also write the numbers as JSON here")
    return p


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def run_qa(args: argparse.Namespace) -> dict[str, Any]:
    check_model_folder(args.model)
    records = read_qa_records(args.data, args.limit)  # input errors before the model loads
    try:
        apply_template(args.template, "")
    except DataError as err:
        raise UsageError(f"--template: {err}") from None
    model = load_model(args.model, args.device, args.dtype)
    tok = load_tokenizer_for(args.model, args.tokenizer, model.config.vocab_size)
    started = time.perf_counter()
    rows, scores = evaluate_qa(model, tok, records, sampling_options(args), template=args.template,
                               batch_size=args.batch_size, stops=args.stop)
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    predictions = Path(args.predictions) if args.predictions else out / "predictions.jsonl"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with open(predictions, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result = {**scores, "model": str(args.model), "data": str(args.data), "template": args.template,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "seconds": round(time.perf_counter() - started, 2), "predictions": str(predictions)}
    _write_json(Path(args.scores) if args.scores else out / "scores.json", result)
    print(f"{args.data}: {scores['count']} items  exact_match {scores['exact_match']:.2f}  "
          f"f1 {scores['f1']:.2f}  rouge_l {scores['rouge_l']:.2f}  (predictions: {predictions})")
    return result


def run_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    check_model_folder(args.model)
    split_dir = Path(args.data) / args.split if args.split else Path(args.data)
    if not split_dir.is_dir():
        raise UsageError(f"{split_dir}: no such split folder (write one with python -m data.prepare)")
    model = load_model(args.model, args.device, args.dtype)
    result = evaluate_perplexity(model, args.data, args.split or None, args.batch_size, args.max_batches)
    result = {**result, "model": str(args.model), "data": str(args.data), "split": args.split}
    if args.scores:
        _write_json(Path(args.scores), result)
    print(f"{split_dir}: {result['tokens']:,} labelled tokens  loss {result['loss']:.4f}  "
          f"perplexity {result['perplexity']:.3f}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run_qa(args) if args.task == "qa" else run_perplexity(args))


if __name__ == "__main__":
    sys.exit(main())
