"""Score a saved model: ``python -m mamba.evaluate {qa,perplexity} MODEL_DIR ...``.

``qa``: generate an answer for every record of a test JSONL ({input, output}, also {prompt,
response}; ``answers`` or a list-valued ``output`` gives several references) or of a SQuAD
v1.1 / v2.0 JSON file (every gold answer is a reference), write the predictions as JSONL
({id?, input, pred, label, exact_match, f1, rouge_l}) and the means as a JSON score file:
exact match, token F1 (the official SQuAD normalisation, best reference) and ROUGE-L, each
x100. Prompts use data.prepare's instruct prompt (``--template``, default ``qa``; a SQuAD
passage goes before it), the format a ``--mode instruct`` fine-tune was trained on.
Unanswerable SQuAD v2 questions are left out unless ``--unanswerable TEXT``: then their
reference is the empty answer, and a prediction that normalises to TEXT counts as empty.

``qa --score PREDICTIONS`` scores an existing file without a model: our predictions JSONL
({pred, label}), or with ``--data GOLD`` rows {id, pred} or the official SQuAD predictions
JSON ({id: answer}) matched by id to GOLD's questions.

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
from data.sources import BadInputLog, iter_squad, load_squad
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
from mamba.qa_metrics import exact_match, normalize_answer, rouge_l, score_all, token_f1

INPUT_KEYS = ("input", "prompt")
REFERENCE_KEYS = ("answers", "output", "response")


@dataclass
class QARecord:
    input: str
    references: list[str]
    label: str | list[str]  # as written in the file, echoed into the predictions
    context: str | None = None  # a passage shown before the question (SQuAD)
    id: str | None = None
    impossible: bool = False  # SQuAD v2: no answer in the passage (reference: the empty answer)


def read_qa_records(path: str | Path, limit: int | None = None) -> list[QARecord]:
    """Every record checked (a bad line anywhere is an error), the first ``limit`` kept."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: file not found")
    squad = load_squad(path)
    if squad is not None:
        records = [_squad_record(q) for q in iter_squad(path, squad, BadInputLog())]
        if not records:
            raise UsageError(f"{path}: no questions")
        return records[:limit] if limit else records
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


def _squad_record(q) -> QARecord:
    # The official evaluation drops golds that normalise to nothing; none left = no answer.
    golds = [] if q.impossible else [a for a in q.answers if normalize_answer(a)]
    return QARecord(q.question, golds or [""], list(q.answers), q.context, q.id, q.impossible or not golds)


def as_scored(prediction: str, no_answer: str | None) -> str:
    """The prediction as scored: one that normalises to ``no_answer`` is the empty answer."""
    if no_answer is not None and normalize_answer(prediction) == normalize_answer(no_answer):
        return ""
    return prediction


def score_rows(preds: Sequence[str], records: Sequence[QARecord],
               no_answer: str | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Prediction rows and the mean scores x100 of ``preds`` against ``records``."""
    scored = [as_scored(p, no_answer) for p in preds]
    rows = [{**({"id": r.id} if r.id is not None else {}), "input": r.input, "pred": p, "label": r.label,
             "exact_match": exact_match(s, r.references), "f1": token_f1(s, r.references),
             "rouge_l": rouge_l(s, r.references)}
            for r, p, s in zip(records, preds, scored, strict=True)]
    return rows, score_all(scored, [r.references for r in records])


def evaluate_qa(model, tok, records: Sequence[QARecord], options: SamplingOptions, *,
                template: str | None = "qa", batch_size: int = 16, stops: Sequence[str] = (),
                no_answer: str | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(prediction rows, scores x100) for ``records``."""
    prompts = [apply_template(template, r.input, r.context) for r in records]
    preds = [cut_at_stop(p, stops).strip() for p in generate_texts(model, tok, prompts, options, batch_size)]
    return score_rows(preds, records, no_answer)


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
    add_model_arguments(qa, optional=True)
    qa.add_argument("--data", metavar="FILE",
                    help="test JSONL {input, output} or a SQuAD v1.1/v2.0 JSON file")
    qa.add_argument("--score", metavar="PREDICTIONS",
                    help="score this predictions file instead of running a model: JSONL {pred, label}; "
                         "with --data, rows {id, pred} or a SQuAD predictions JSON {id: answer}")
    qa.add_argument("--unanswerable", metavar="TEXT",
                    help="keep SQuAD v2's unanswerable questions (default: leave them out); a prediction "
                         "equal to TEXT after normalisation means 'no answer' (\"\" for official files)")
    qa.add_argument("--template", default="qa", help="data.prepare instruct template (name or string)")
    qa.add_argument("--limit", type=int, default=None, help="score only the first N records")
    qa.add_argument("--predictions", metavar="FILE",
                    help="where to write the predictions JSONL (default: OUT/predictions.jsonl)")
    qa.add_argument("--scores", metavar="FILE",
                    help="scores JSON (default: OUT/scores.json; with --score only if given)")
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


def _answerable(records: list[QARecord], no_answer: str | None) -> tuple[list[QARecord], int]:
    """Without ``--unanswerable``, SQuAD v2's unanswerable questions are left out (and counted)."""
    if no_answer is not None:
        return records, 0
    kept = [r for r in records if not r.impossible]
    return kept, len(records) - len(kept)


def _print_scores(what: str, scores: dict[str, Any], skipped: int, tail: str = "") -> None:
    note = f"  ({skipped} unanswerable left out; --unanswerable TEXT keeps them)" if skipped else ""
    print(f"{what}: {scores['count']} items  exact_match {scores['exact_match']:.2f}  "
          f"f1 {scores['f1']:.2f}  rouge_l {scores['rouge_l']:.2f}{tail}{note}")


def run_qa(args: argparse.Namespace) -> dict[str, Any]:
    if args.score:
        return run_score(args)
    if args.model is None or args.data is None:
        raise UsageError("qa needs MODEL and --data FILE (or --score PREDICTIONS to score a file)")
    check_model_folder(args.model)
    records = read_qa_records(args.data, args.limit)  # input errors before the model loads
    records, skipped = _answerable(records, args.unanswerable)
    if not records:
        raise UsageError(f"{args.data}: every question is unanswerable; pass --unanswerable TEXT")
    try:
        apply_template(args.template, "")
    except DataError as err:
        raise UsageError(f"--template: {err}") from None
    model = load_model(args.model, args.device, args.dtype)
    tok = load_tokenizer_for(args.model, args.tokenizer, model.config.vocab_size, args.eos_token)
    started = time.perf_counter()
    rows, scores = evaluate_qa(model, tok, records, sampling_options(args), template=args.template,
                               batch_size=args.batch_size, stops=args.stop, no_answer=args.unanswerable)
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    predictions = Path(args.predictions) if args.predictions else out / "predictions.jsonl"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with open(predictions, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result = {**scores, "model": str(args.model), "data": str(args.data), "template": args.template,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "unanswerable": args.unanswerable, "skipped_unanswerable": skipped,
              "seconds": round(time.perf_counter() - started, 2), "predictions": str(predictions)}
    _write_json(Path(args.scores) if args.scores else out / "scores.json", result)
    _print_scores(str(args.data), scores, skipped, f"  (predictions: {predictions})")
    return result


def _squad_predictions(path: str | Path) -> dict[str, Any] | None:
    """The file's object if it is one JSON object of predictions by id (not a row with 'pred')."""
    try:
        whole = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return whole if isinstance(whole, dict) and "pred" not in whole else None


def read_prediction_map(path: str | Path) -> dict[str, str]:
    """``{id: prediction}`` from a SQuAD predictions JSON or from JSONL rows {id, pred}."""
    whole = _squad_predictions(path)
    if whole is not None:
        wrong = next((k for k, v in whole.items() if not isinstance(v, str)), None)
        if wrong is not None:
            raise UsageError(f"{path}: the prediction for id {wrong!r} must be a string")
        return whole
    found = {}
    for where, row in iter_jsonl(path):
        if "id" not in row:
            raise UsageError(f"{where}: missing field 'id' (matches the row to a question of --data)")
        found[str(row["id"])] = pick_field(row, ("pred",), where)
    return found


def read_prediction_rows(path: str | Path) -> tuple[list[str], list[QARecord]]:
    """Predictions and their records from our predictions JSONL ({pred, label})."""
    if _squad_predictions(path) is not None:
        raise UsageError(f"{path}: predictions by id ({{id: answer}}): give the questions with --data GOLD")
    preds, records = [], []
    for where, row in iter_jsonl(path):
        pred = pick_field(row, ("pred",), where)
        label = row.get("label")
        golds = [label] if isinstance(label, str) else label
        if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
            raise UsageError(f"{where}: field 'label' must be a string or a list of strings (the "
                             "references); or give --data with the questions")
        refs = [g for g in golds if normalize_answer(g)]  # as read_qa_records does for SQuAD
        records.append(QARecord(str(row.get("input", "")), refs or [""], label, id=row.get("id"),
                                impossible=golds == []))  # a SQuAD v2 question without answers
        preds.append(pred)
    if not records:
        raise UsageError(f"{path}: no predictions")
    return preds, records


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    """``--score``: no model, only a predictions file (and the questions, with --data)."""
    if args.model is not None:
        raise UsageError(f"--score scores an existing file: drop the model argument {args.model!r}")
    if not Path(args.score).is_file():
        raise UsageError(f"{args.score}: file not found")
    if args.data:
        kept, skipped = _answerable(read_qa_records(args.data), args.unanswerable)
        by_id = read_prediction_map(args.score)
        missing = [r.id for r in kept if r.id not in by_id]
        if any(r.id is None for r in kept) or missing:
            first = missing[0] if missing else "(the file has no ids)"
            raise UsageError(f"{args.score}: no prediction for {len(missing) or len(kept)} question(s) of "
                             f"{args.data}, e.g. {first}")
        preds = [by_id[str(r.id)] for r in kept]
    else:
        all_preds, records = read_prediction_rows(args.score)
        kept, skipped = _answerable(records, args.unanswerable)
        keep_all = args.unanswerable is not None  # the same rule as _answerable
        preds = [p for p, r in zip(all_preds, records, strict=True) if keep_all or not r.impossible]
    if not kept:
        raise UsageError(f"{args.score}: every question is unanswerable; pass --unanswerable TEXT")
    _, scores = score_rows(preds, kept, args.unanswerable)
    result = {**scores, "predictions": str(args.score), "data": args.data, "unanswerable": args.unanswerable,
              "skipped_unanswerable": skipped}
    if args.scores:
        _write_json(Path(args.scores), result)
    _print_scores(str(args.score), scores, skipped)
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
