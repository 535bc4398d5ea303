"""QA metrics on hand-made cases, `python -m mamba.evaluate qa / perplexity`, and input errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import ByteTokenizer
from mamba.evaluate import read_qa_records
from mamba.generate import UsageError
from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.qa_metrics import exact_match, normalize_answer, rouge_l, score_all, token_f1

ROOT = Path(__file__).resolve().parents[1]


# ---- metrics --------------------------------------------------------------------------------
def test_normalisation_is_squad():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    # The official order: punctuation goes before articles, so "the-end" is one word, "theend"
    assert normalize_answer("The-end") == "theend"
    assert normalize_answer("Mamba\u2019s") == "mamba\u2019s"  # ASCII punctuation only, as the official


def test_exact_match_and_f1_known_values():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # pred {eiffel}, ref {eiffel, tower}: precision 1, recall 1/2 -> F1 2/3
    assert token_f1("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    # pred {red, big, dog}, ref {big, red, cat}: 2 common; P = R = 2/3 -> F1 2/3
    assert token_f1("red big dog", "big red cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0
    assert token_f1("x b b", "b b c") == pytest.approx(2 / 3)  # counts, not sets (sets: 1/2)


def test_best_of_several_references():
    refs = ["Paris", "the city of Paris"]
    assert exact_match("paris", refs) == 1.0
    # best reference: pred {city, of, paris} in {city, of, paris, france}: P 1, R 3/4
    assert token_f1("city of Paris", ["London", "the city of Paris France"]) == pytest.approx(1.5 / 1.75)
    # ROUGE keeps articles: LCS 3 of 4 predicted, 3 of 3 reference tokens -> 6/7
    assert rouge_l("the city of paris", ["london", "city of paris"]) == pytest.approx(6 / 7)


def test_rouge_l_known_value():
    # LCS("the cat sat on mat", "a cat sat on the mat") = cat sat on mat = 4; P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat sat on mat", "a cat sat on the mat") == pytest.approx(2 * p * r / (p + r))


def test_score_all_means_times_100():
    scores = score_all(["odd", "Blue.", "nav x"], ["odd", ["blue", "grey"], "nav"])
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    assert scores["rouge_l"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    assert scores["count"] == 3


# ---- reading the test file ------------------------------------------------------------------
@pytest.mark.parametrize("lines,message", [
    (['{"input": "a", "output": "b"}', '{"input": "c", "output": "d"'], "t.jsonl:2: invalid JSON"),
    (['{"input": "a\tb"}'], r"t.jsonl:1: invalid JSON: Invalid control character at column 13$"),
    (['{"input": "a", "output": "b"}', "", '{"input": "c"}'], "t.jsonl:3: missing field"),
    (['{"output": "b"}'], "t.jsonl:1: missing field"),
    (['{"input": "a", "output": 3}'], "t.jsonl:1: field 'output' must be"),
    (['["a", "b"]'], "t.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=message):
        read_qa_records(path)


def test_record_formats(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "q1", "output": "a1"}\n{"prompt": "q2", "response": "a2"}\n'
                    '{"input": "q3", "answers": ["x", "y"]}\n')
    records = read_qa_records(path)
    assert [(r.input, r.references) for r in records] == [("q1", ["a1"]), ("q2", ["a2"]), ("q3", ["x", "y"])]


# ---- the command line -----------------------------------------------------------------------
def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mamba.evaluate", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=258, layer_pattern="Mm",
                         ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16})
    path = tmp_path_factory.mktemp("ev") / "model"
    MambaLMHeadModel(config).save_pretrained(path)
    return path


def test_qa_cli_writes_predictions_and_scores(model_dir, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text('{"input": "Is 3 odd?", "output": "odd"}\n'
                    '{"input": "Say hi", "answers": ["hi", "hello"]}\n'
                    '{"input": "unused", "output": "x"}\n')
    result = cli("qa", model_dir, "--data", data, "--limit", 2, "--max-new-tokens", 5,
                 "--out", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert [r["input"] for r in rows] == ["Is 3 odd?", "Say hi"]
    assert [r["label"] for r in rows] == ["odd", ["hi", "hello"]]
    # predictions are what the model generates for the qa template, cut at EOS and stripped
    model = MambaLMHeadModel.from_pretrained(model_dir).eval()
    tok = ByteTokenizer()
    for row in rows:
        ids = torch.tensor([tok.encode(f"Question: {row['input']}\nAnswer: ")])
        out = model.generate(ids, 5, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        out = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert row["pred"] == tok.decode(out).strip()
    assert scores["count"] == 2
    assert scores["exact_match"] == pytest.approx(50 * sum(r["exact_match"] for r in rows))
    assert scores["f1"] == pytest.approx(50 * sum(r["f1"] for r in rows))


def test_qa_cli_bad_line_is_one_line_error(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    result = cli("qa", model_dir, "--data", data)
    assert result.returncode == 2
    assert result.stderr == f"error: {data}:2: missing field: need one of 'answers', 'output', 'response' " \
                            "(the reference answer); fields: input\n"
    missing = cli("qa", tmp_path / "no_model", "--data", data)
    assert missing.returncode == 2 and missing.stderr.startswith("error: model folder") \
        and missing.stderr.count("\n") == 1


def test_perplexity_matches_a_direct_computation(model_dir, tmp_path):
    from data.dataset import build_dataloader
    from data.prepare import prepare

    shards = tmp_path / "qa"
    prepare([str(ROOT / "data" / "corpus" / "qa_test.jsonl")], str(shards), 64, mode="instruct",
            val_ratio=0.1, progress=False)
    result = cli("perplexity", model_dir, "--data", shards, "--split", "val", "--batch-size", 4,
                 "--scores", tmp_path / "ppl.json")
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "ppl.json").read_text())
    model = MambaLMHeadModel.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in build_dataloader(str(shards), None, "val", batch_size=3, shuffle=False, drop_last=False):
            for i in range(len(batch["input_ids"])):  # one row at a time, another batching
                logits = model(batch["input_ids"][i:i + 1], seq_idx=batch["seq_idx"][i:i + 1])[0, :, :258]
                labels = batch["labels"][i]
                total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
                count += int((labels != -100).sum())
    assert got["tokens"] == count > 0
    assert got["loss"] == pytest.approx(total / count, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert math.log(258) - 1.0 < got["loss"] < math.log(258) + 1.5  # an untrained model: ~uniform
