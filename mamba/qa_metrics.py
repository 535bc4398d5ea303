"""SQuAD-style QA scores: exact match and token F1 after SQuAD normalisation, plus ROUGE-L.

Each score takes one prediction and one or more reference answers and keeps the best match
(the SQuAD rule for questions with several valid answers). Scores here are in [0, 1];
:func:`score_all` averages them over a dataset and multiplies by 100.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
_ROUGE_TOKEN = re.compile(r"[a-z0-9]")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("need at least one reference answer")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(references)))


def _f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:  # SQuAD v2: both empty is a match, one empty is not
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    return max(_f1(prediction, r) for r in _as_list(references))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # Google's package, the reference ROUGE in Python

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence of rouge-score's tokens), best reference."""
    scorer = _rouge_scorer()
    return max(_rouge_l(scorer, prediction, r) for r in _as_list(references))


def _rouge_l(scorer, prediction: str, reference: str) -> float:
    if not _ROUGE_TOKEN.search(prediction.lower()) and not _ROUGE_TOKEN.search(reference.lower()):
        return 1.0  # no tokens on either side (rouge-score keeps [a-z0-9]): a match, as in F1
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def score_all(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over a dataset, each x100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "rouge_l": 0.0, "count": 0}
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact_match": 100.0 * sum(exact_match(p, r) for p, r in pairs) / n,
        "f1": 100.0 * sum(token_f1(p, r) for p, r in pairs) / n,
        "rouge_l": 100.0 * sum(rouge_l(p, r) for p, r in pairs) / n,
        "count": n,
    }
