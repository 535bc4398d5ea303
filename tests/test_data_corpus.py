"""The bundled corpora: reproducible from data/make_corpus.py, small, leak-free, preparable."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data import CORPUS_DIR, QA_TEST, QA_TRAIN, TINY_CORPUS
from data.make_corpus import generate, sky_colour
from data.prepare import prepare

FILES = ("tiny_corpus.jsonl", "qa_train.jsonl", "qa_test.jsonl")


def load(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_files_are_exactly_what_the_generator_makes(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (CORPUS_DIR / name).read_bytes(), name
    assert sum((CORPUS_DIR / n).stat().st_size for n in FILES) < 3 << 20


def test_test_questions_never_leak_and_answers_follow_the_rules() -> None:
    train, test = load(QA_TRAIN), load(QA_TEST)
    assert len(train) > 500 and len(test) >= 200
    test_questions = {r["input"] for r in test}
    assert not test_questions & {r["input"] for r in train}
    corpus = TINY_CORPUS.read_text(encoding="utf-8")
    assert not [q for q in test_questions if q in corpus]
    for record in train + test:
        question, answer = record["input"], record["output"]
        if m := re.fullmatch(r"Is (\d+) even or odd\?", question):
            assert answer == ("even" if int(m[1]) % 2 == 0 else "odd")
        elif m := re.fullmatch(r"What is (\d) plus (\d)\?", question):
            assert answer == str(int(m[1]) + int(m[2]))
        elif m := re.fullmatch(r"Reverse the word '(\w+)'\.", question):
            assert answer == m[1][::-1]
        elif m := re.fullmatch(r"What colour is the sky in (\w+)\?", question):
            assert answer == sky_colour(m[1])
            if question in test_questions:  # no fact in the corpus gives a test city away
                assert f"The sky in {m[1]} is" not in corpus


@pytest.mark.parametrize("mode", ["pretrain", "instruct"])
def test_bundled_corpora_prepare(tmp_path: Path, mode: str) -> None:
    source = TINY_CORPUS if mode == "pretrain" else QA_TRAIN
    summary = prepare([str(source)], str(tmp_path / "out"), 256, mode=mode, progress=False)
    train = summary.splits["train"]
    assert train.documents > 500 and summary.splits["val"].rows > 0
    if mode == "pretrain":
        assert train.tokens > 1_000_000 and train.padding_fraction(256) < 0.001
