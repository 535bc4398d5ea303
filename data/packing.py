"""Pack tokenized documents into fixed-length rows of (token, position, loss bit).

Pure numpy, no I/O: data.prepare feeds chunks of tokenized documents in and writes the
rows that come out. The loss-bit conventions are those documented in data/layout.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Rows(NamedTuple):
    """``[num_rows, seq_len]`` arrays ready for DataLayout.encode."""

    tokens: np.ndarray  # int64
    positions: np.ndarray  # int64
    loss: np.ndarray  # bool


@dataclass
class PackStats:
    documents: int = 0
    tokens: int = 0  # document tokens written, EOS included, padding excluded
    rows: int = 0
    padding: int = 0
    loss_tokens: int = 0  # positions that get a label (loss bit set and target in the segment)
    too_long: int = 0  # instruction examples longer than a row, skipped

    def add_rows(self, rows: Rows, pad_count: int) -> None:
        self.rows += len(rows.tokens)
        self.padding += pad_count
        self.loss_tokens += int((rows.loss[:, :-1] & (rows.positions[:, 1:] != 0)).sum())

    def padding_fraction(self, seq_len: int) -> float:
        return self.padding / (self.rows * seq_len) if self.rows else 0.0


def _positions(starts: np.ndarray) -> np.ndarray:
    """Index inside the current segment; ``starts`` is [R, L] with a segment start flagged."""
    starts = starts.copy()
    starts[:, 0] = True  # every row begins a segment, even mid-document
    idx = np.arange(starts.shape[1])
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int64)


class PretrainPacker:
    """Concatenate ``doc + EOS`` and cut into rows; documents may span rows."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.stats = PackStats()
        self._tokens = np.zeros(0, np.int64)  # carry: the unfinished last row
        self._starts = np.zeros(0, bool)
        self._loss = np.zeros(0, bool)

    def add(self, docs: list[np.ndarray]) -> Rows | None:
        docs = [d for d in docs if len(d)]
        if docs:
            lengths = np.array([len(d) + 1 for d in docs])
            ends = np.cumsum(lengths)
            eos = np.array([self.eos_id], np.int64)
            pieces = [part for d in docs for part in (np.asarray(d, np.int64), eos)]
            starts = np.zeros(ends[-1], bool)
            starts[ends - lengths] = True
            loss = np.ones(ends[-1], bool)
            loss[ends - 1] = False  # EOS: its "next token" belongs to another document
            self._tokens = np.concatenate([self._tokens, *pieces])
            self._starts = np.concatenate([self._starts, starts])
            self._loss = np.concatenate([self._loss, loss])
            self.stats.documents += len(docs)
            self.stats.tokens += int(ends[-1])
        cut = len(self._tokens) // self.seq_len * self.seq_len
        if cut == 0:
            return None
        shape = (-1, self.seq_len)
        rows = Rows(
            self._tokens[:cut].reshape(shape),
            _positions(self._starts[:cut].reshape(shape)),
            self._loss[:cut].reshape(shape),
        )
        self._tokens, self._starts, self._loss = self._tokens[cut:], self._starts[cut:], self._loss[cut:]
        self.stats.add_rows(rows, 0)
        return rows

    def finish(self) -> Rows | None:
        """Pad the unfinished last row (padding is its own segment, loss bit 0)."""
        used = len(self._tokens)
        if used == 0:
            return None
        pad = self.seq_len - used
        tokens = np.concatenate([self._tokens, np.full(pad, self.pad_id, np.int64)])
        starts = np.concatenate([self._starts, np.zeros(pad, bool)])
        starts[used] = True
        loss = np.concatenate([self._loss, np.zeros(pad, bool)])
        rows = Rows(tokens[None], _positions(starts[None]), loss[None])
        self._tokens, self._starts, self._loss = (np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
        self.stats.add_rows(rows, pad)
        return rows


def instruction_example(prompt: np.ndarray, answer: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``prompt + answer + EOS`` and loss bits that make only answer + EOS the labels.

    The bit at t scores the prediction of token t + 1, so it is set from the last prompt
    token (which predicts the first answer token) through the last answer token (which
    predicts EOS).
    """
    k, m = len(prompt), len(answer)
    tokens = np.concatenate([np.asarray(prompt, np.int64), np.asarray(answer, np.int64), [eos_id]])
    loss = np.zeros(k + m + 1, bool)
    loss[max(k - 1, 0): k + m] = True
    return tokens, loss


class InstructPacker:
    """Whole examples only: several per row (``pack``) or one per row, the rest padded."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, pack: bool) -> None:
        self.seq_len, self.eos_id, self.pad_id, self.pack = seq_len, eos_id, pad_id, pack
        self.stats = PackStats()
        self._row: list[tuple[np.ndarray, np.ndarray]] = []
        self._fill = 0

    def add(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> Rows | None:
        finished: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for prompt, answer in examples:
            tokens, loss = instruction_example(prompt, answer, self.eos_id)
            if len(tokens) > self.seq_len:
                self.stats.too_long += 1
                continue
            if self._row and (not self.pack or self._fill + len(tokens) > self.seq_len):
                finished.append(self._close_row())
            self._row.append((tokens, loss))
            self._fill += len(tokens)
            self.stats.documents += 1
            self.stats.tokens += len(tokens)
        return self._stack(finished)

    def finish(self) -> Rows | None:
        return self._stack([self._close_row()] if self._row else [])

    def _close_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pad = self.seq_len - self._fill
        parts = self._row + ([(np.full(pad, self.pad_id, np.int64), np.zeros(pad, bool))] if pad else [])
        tokens = np.concatenate([t for t, _ in parts])
        loss = np.concatenate([bits for _, bits in parts])
        positions = np.concatenate([np.arange(len(t)) for t, _ in parts])
        self._row, self._fill = [], 0
        self.stats.padding += pad
        return tokens, positions, loss

    def _stack(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Rows | None:
        if not rows:
            return None
        out = Rows(*(np.stack(column) for column in zip(*rows, strict=True)))
        self.stats.add_rows(out, 0)  # padding already counted per row
        return out
