"""SQuAD v1.1 / v2.0 files as published: data.prepare --mode instruct, evaluate qa --data, --score."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from data.dataset import PackedDataset
from data.errors import DataError
from data.prepare import main as prepare_main
from data.prepare import prepare
from data.tokenizer import ByteTokenizer
from mamba.evaluate import main as evaluate_main
from mamba.evaluate import read_qa_records

EOS = ByteTokenizer.eos_token_id
MAMBA = "Mamba is a selective state space model. It was introduced in 2023."
PARIS = "Paris is the capital of France."
V11 = {"version": "1.1", "data": [
    {"title": "Mamba", "paragraphs": [{"context": MAMBA, "qas": [
        {"id": "m1", "question": "What is Mamba?",
         "answers": [{"text": "a selective state space model", "answer_start": 9},
                     {"text": "selective state space model", "answer_start": 11}]},
        {"id": "m2", "question": "When was it introduced?",
         "answers": [{"text": "2023", "answer_start": 62}]},
    ]}]},
    {"title": "Paris", "paragraphs": [{"context": PARIS, "qas": [
        {"id": "p1", "question": "What is the capital of France?",
         "answers": [{"text": "Paris", "answer_start": 0}]},
    ]}]},
]}


def v20() -> dict:
    doc = copy.deepcopy(V11)
    doc["version"] = "v2.0"
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["is_impossible"] = False
    doc["data"][1]["paragraphs"][0]["qas"].append(
        {"id": "p2", "question": "What is the capital of Mars?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Paris", "answer_start": 0}]})
    return doc


def write(path: Path, doc: dict, pretty: bool = False) -> Path:
    path.write_text(json.dumps(doc, indent=2 if pretty else None))  # official files: one line
    return path


def examples(out: Path) -> list[tuple[str, str]]:
    """(row text, labelled text) for each one-example row (--no-pack), byte tokenizer."""
    dataset = PackedDataset(str(out), None, "train", shuffle=False)
    found = []
    for i in range(dataset.num_samples):
        row = dataset[i]
        ids = [t for t in row["input_ids"].tolist() if t < 256]
        labels = row["labels"].tolist()
        assert labels[labels.index(EOS) + 1:] == [-100] * (len(labels) - labels.index(EOS) - 1)
        found.append((bytes(ids).decode(), bytes(t for t in labels if 0 <= t < 256).decode()))
    return found


def prompt(context: str, question: str) -> str:
    return f"Context: {context}\n\nQuestion: {question}\nAnswer: "


# ---- data.prepare ----------------------------------------------------------------------------
def test_prepare_squad_v11_prompts_and_first_answer_targets(tmp_path: Path) -> None:
    summary = prepare([str(write(tmp_path / "train-v1.1.json", V11))], str(tmp_path / "out"), 160,
                      mode="instruct", pack=False, val_ratio=0, progress=False)
    assert summary.splits["train"].documents == 3 and summary.skipped_unanswerable == 0
    assert examples(tmp_path / "out") == [
        (prompt(MAMBA, "What is Mamba?") + "a selective state space model", "a selective state space model"),
        (prompt(MAMBA, "When was it introduced?") + "2023", "2023"),
        (prompt(PARIS, "What is the capital of France?") + "Paris", "Paris"),
    ]


def test_prepare_squad_v20_unanswerable_skipped_or_given_an_answer(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "dev-v2.0.json", v20(), pretty=True)  # a pretty-printed file works too
    argv = ["--input", str(source), "--output", str(tmp_path / "skip"), "--seq-len", "160",
            "--mode", "instruct", "--no-pack", "--val-ratio", "0", "--no-progress"]
    assert prepare_main(argv) == 0
    assert "skipped 1 unanswerable SQuAD questions" in capsys.readouterr().out
    assert [target for _, target in examples(tmp_path / "skip")] == ["a selective state space model", "2023",
                                                                     "Paris"]
    argv[3] = str(tmp_path / "kept")
    assert prepare_main([*argv, "--unanswerable", "unanswerable", "--template", "alpaca"]) == 0
    rows = examples(tmp_path / "kept")
    assert len(rows) == 4
    want = f"Context: {PARIS}\n\n### Instruction:\nWhat is the capital of Mars?\n\n### Response:\n" \
           "unanswerable"
    assert rows[3] == (want, "unanswerable")


@pytest.mark.parametrize(("content", "mode", "message"), [
    (json.dumps(V11), "pretrain", r"a SQuAD file holds questions and answers: use --mode instruct"),
    (json.dumps({"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "a", "question": "q", "answers": [{"text": "x", "answer_start": 0}]},
        {"id": "b", "question": "q", "answers": [{"answer_start": 0}]}]}]}]}), "instruct",
     r"s.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: needs 'question' \(a string\) and 'answers'"),
    (json.dumps({"version": "1.1", "data": [{"paragraphs": [{"qas": []}]}]}), "instruct",
     r"s.json: data\[0\]\.paragraphs\[0\]: needs 'context' \(a string\) and 'qas' \(a list\)"),
    ('{\n  "data": [\n    {"paragraphs": [}\n  ]\n}\n', "instruct",
     r"s.json:3: invalid JSON: Expecting value at column 21"),  # the "}"
    ('{\n  "text": "a pretty-printed object"\n}\n', "pretrain",
     r"s.json: one JSON document over several lines"),
])
def test_bad_squad_files_are_clear_errors(tmp_path: Path, content: str, mode: str, message: str) -> None:
    (tmp_path / "s.json").write_text(content)
    with pytest.raises(DataError, match=message):
        prepare([str(tmp_path / "s.json")], str(tmp_path / "out"), 64, mode=mode, progress=False)
    assert not (tmp_path / "out").exists()


# ---- evaluate qa -----------------------------------------------------------------------------
def test_read_squad_records_keep_every_gold(tmp_path: Path) -> None:
    records = read_qa_records(write(tmp_path / "dev.json", v20()))
    assert [(r.id, r.input, r.context, r.references, r.impossible) for r in records] == [
        ("m1", "What is Mamba?", MAMBA, ["a selective state space model", "selective state space model"],
         False),
        ("m2", "When was it introduced?", MAMBA, ["2023"], False),
        ("p1", "What is the capital of France?", PARIS, ["Paris"], False),
        ("p2", "What is the capital of Mars?", PARIS, [""], True),  # the official v2 rule: the empty answer
    ]


# Hand-computed with the official normalisation (lowercase, drop punctuation, then articles, squash spaces):
# m1 "The selective state-space model" -> {selective, statespace, model} vs the best gold {selective, state,
# space, model}: 2 common, P 2/3, R 1/2, F1 4/7.  m2 "in 2023." -> {in, 2023} vs {2023}: F1 2/3.  p1: exact.
PREDICTIONS = {"m1": "The selective state-space model", "m2": "in 2023.", "p1": "paris"}
F1_ANSWERABLE = [4 / 7, 2 / 3, 1.0]


def score(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    out = tmp_path / "scores.json"
    assert evaluate_main(["qa", *args, "--scores", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_score_official_predictions_against_all_golds(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    gold = write(tmp_path / "dev-v2.0.json", v20())
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({**PREDICTIONS, "p2": ""}))
    result = score(tmp_path, capsys, "--score", str(preds), "--data", str(gold))
    assert (result["count"], result["skipped_unanswerable"]) == (3, 1)  # by default p2 is left out
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * sum(F1_ANSWERABLE) / 3)
    # official v2 scoring: keep p2, whose empty prediction matches the empty answer
    result = score(tmp_path, capsys, "--score", str(preds), "--data", str(gold), "--unanswerable", "")
    assert result["count"] == 4 and result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (sum(F1_ANSWERABLE) + 1) / 4)
    # a model trained with --unanswerable TEXT answers TEXT: that is the empty answer (wrong for p1)
    preds.write_text(json.dumps({**PREDICTIONS, "p1": "No answer", "p2": "no answer."}))
    result = score(tmp_path, capsys, "--score", str(preds), "--data", str(gold),
                   "--unanswerable", "no answer")
    assert result["exact_match"] == pytest.approx(25.0)
    assert result["f1"] == pytest.approx(100 * (4 / 7 + 2 / 3 + 0 + 1) / 4)
    # rows {id, pred} score the same as the official mapping
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": k, "pred": v}) + "\n" for k, v in PREDICTIONS.items()))
    assert score(tmp_path, capsys, "--score", str(rows), "--data", str(gold))["f1"] == pytest.approx(
        100 * sum(F1_ANSWERABLE) / 3)


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("missing", ["--score", "{preds}", "--data", "{gold}"], "no prediction for 1 question"),
    ("mapping", ["--score", "{preds}"],
     r"predictions by id \(\{id: answer\}\): give the questions with --data"),
    ("mapping", ["MODEL", "--score", "{preds}"], "--score scores an existing file: drop the model argument"),
    ("mapping", [], r"qa needs MODEL and --data FILE \(or --score PREDICTIONS"),
])
def test_score_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, args: list[str],
                            message: str) -> None:
    gold = write(tmp_path / "dev.json", V11)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"m1": "x", "m2": "y"} if setup == "missing" else PREDICTIONS))
    argv = ["qa", *(a.format(preds=preds, gold=gold) for a in args)]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_evaluate_model_on_squad_then_rescore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mamba.model import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=258, layer_pattern="Mm",
                         ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16})
    model = MambaLMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "model")
    gold = write(tmp_path / "dev-v2.0.json", v20())
    out = tmp_path / "ev"
    assert evaluate_main(["qa", str(tmp_path / "model"), "--data", str(gold), "--max-new-tokens", "4",
                          "--unanswerable", "none", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["m1", "m2", "p1", "p2"] and rows[3]["label"] == []
    tok = ByteTokenizer()
    for row, context in zip(rows, [MAMBA, MAMBA, PARIS, PARIS], strict=True):
        ids = torch.tensor([tok.encode(prompt(context, row["input"]))])
        new = model.generate(ids, 4, eos_token_id=EOS)[0, ids.shape[1]:].tolist()
        assert row["pred"] == tok.decode(new[:new.index(EOS)] if EOS in new else new).strip()
    written = json.loads((out / "scores.json").read_text())
    assert written["count"] == 4
    rescored = score(tmp_path, capsys, "--score", str(out / "predictions.jsonl"), "--unanswerable", "none")
    for key in ("count", "exact_match", "f1", "rouge_l"):
        assert rescored[key] == pytest.approx(written[key])
    default = score(tmp_path, capsys, "--score", str(out / "predictions.jsonl"))
    assert (default["count"], default["skipped_unanswerable"]) == (3, 1)
