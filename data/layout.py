"""The DataLayout word: one integer per token carrying token id, position and loss bit.

Default layout ``int32`` (vocab <= 65,536, seq_len <= 16,384)::

    bit 31    30     29 ........ 16   15 ........ 0
        0   loss     position            token id

Wide layout ``int64`` (vocab <= 2**32, seq_len <= 2**30) for large vocabularies::

    bit 63    62     61 ........ 32   31 ........ 0
        0   loss     position            token id

The sign bit stays 0 so words are non-negative in either signed dtype.

Position is the index inside the current document *segment* of the row. Position 0 marks
a segment start, so ``seq_idx = cumsum(position == 0) - 1`` numbers the packed documents
of a row and lets the model reset its state (SSM state, conv window, attention) between
them. A document longer than a row continues in the next row as a new segment (position 0
again): rows are independent samples after shuffling, so nothing may be carried over.

Meaning of the loss bit, and how labels follow from it
------------------------------------------------------
The loss bit at position ``t`` says "the prediction made at ``t`` (of token ``t + 1``)
counts in the loss". :func:`decode_labels` turns words into next-token labels::

    labels[t] = token[t + 1]  if loss[t] == 1 and t + 1 < seq_len and position[t + 1] != 0
              = -100          otherwise

so a label never crosses a document boundary or the end of a row, whatever the bit says.
Choices made by ``data.prepare``:

* Pretraining: every document is followed by EOS, which belongs to the document. The last
  real token predicts EOS (bit 1), so the model learns where documents end. EOS itself has
  bit 0 (its "next token" is an unrelated document). Padding has bit 0.
* The last token of a row whose document continues in the next row keeps bit 1, but its
  target lies in the next row, so its label is -100: one lost prediction per row cut.
* Instruction data: bit 1 exactly on the positions whose *next* token is an answer token
  or the closing EOS, i.e. from the last prompt token to the last answer token. Only
  answer tokens (and EOS) ever appear as labels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from data.errors import DataError

IGNORE_INDEX = -100  # what torch's cross_entropy skips by default


class LayoutOverflowError(DataError):
    """A token id or position does not fit the layout's bit fields."""


@dataclass(frozen=True)
class DataLayout:
    """Bit fields of one word; see the module docstring."""

    name: str
    dtype_name: str
    token_bits: int
    position_bits: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dtype_name)

    @property
    def position_shift(self) -> int:
        return self.token_bits

    @property
    def loss_shift(self) -> int:
        return self.token_bits + self.position_bits

    @property
    def max_vocab_size(self) -> int:
        return 1 << self.token_bits

    @property
    def max_seq_len(self) -> int:
        return 1 << self.position_bits

    def check_vocab_size(self, vocab_size: int) -> None:
        if vocab_size > self.max_vocab_size:
            raise LayoutOverflowError(
                f"vocab_size {vocab_size} does not fit layout {self.name!r} "
                f"(at most {self.max_vocab_size} token ids){self._fix_hint()}"
            )

    def check_seq_len(self, seq_len: int) -> None:
        if not 1 <= seq_len <= self.max_seq_len:
            raise LayoutOverflowError(
                f"seq_len {seq_len} does not fit layout {self.name!r} "
                f"(1 <= seq_len <= {self.max_seq_len}){self._fix_hint()}"
            )

    def _fix_hint(self) -> str:
        return "; use the wide layout 'int64'" if self.name != WIDE.name else ""

    def encode(self, token_ids: np.ndarray, positions: np.ndarray, loss: np.ndarray) -> np.ndarray:
        """Pack equally shaped arrays into words of ``self.dtype``."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        bits = np.asarray(loss).astype(np.int64)
        if not tokens.shape == pos.shape == bits.shape:
            raise ValueError(
                f"shapes differ: token_ids {tokens.shape}, positions {pos.shape}, loss {bits.shape}"
            )
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.max_vocab_size:
                bad = lo if lo < 0 else hi
                raise LayoutOverflowError(
                    f"token id {bad} does not fit layout {self.name!r} "
                    f"(0 <= id < {self.max_vocab_size}){self._fix_hint()}"
                )
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or hi >= self.max_seq_len:
                bad = lo if lo < 0 else hi
                raise LayoutOverflowError(
                    f"position {bad} does not fit layout {self.name!r} "
                    f"(0 <= position < {self.max_seq_len}, so seq_len <= {self.max_seq_len})"
                    f"{self._fix_hint()}"
                )
            if bits.min() < 0 or bits.max() > 1:
                raise ValueError("loss bits must be 0 or 1")
        words = tokens | (pos << self.position_shift) | (bits << self.loss_shift)
        return words.astype(self.dtype)

    def decode(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unpack words into ``(token_ids int64, positions int64, loss bool)``."""
        w = np.asarray(words).astype(np.int64)
        tokens = w & ((1 << self.token_bits) - 1)
        positions = (w >> self.position_shift) & ((1 << self.position_bits) - 1)
        loss = ((w >> self.loss_shift) & 1).astype(bool)
        return tokens, positions, loss


DEFAULT = DataLayout(name="int32", dtype_name="int32", token_bits=16, position_bits=14)
WIDE = DataLayout(name="int64", dtype_name="int64", token_bits=32, position_bits=30)
LAYOUTS: dict[str, DataLayout] = {DEFAULT.name: DEFAULT, WIDE.name: WIDE}


def get_layout(name: str) -> DataLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}") from None


def choose_layout(name: str, vocab_size: int, seq_len: int) -> DataLayout:
    """Resolve ``'auto'`` to the default layout when it fits, else the wide one; check fit."""
    if name == "auto":
        fits = vocab_size <= DEFAULT.max_vocab_size and seq_len <= DEFAULT.max_seq_len
        layout = DEFAULT if fits else WIDE
    else:
        layout = get_layout(name)
    layout.check_vocab_size(vocab_size)
    layout.check_seq_len(seq_len)
    return layout


def seq_idx_from_positions(positions: np.ndarray) -> np.ndarray:
    """Document index inside each row: ``cumsum(position == 0) - 1`` along the last axis."""
    return (np.cumsum(np.asarray(positions) == 0, axis=-1) - 1).astype(np.int32)


def decode_labels(tokens: np.ndarray, positions: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Next-token labels (int64) with IGNORE_INDEX where the loss does not apply."""
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    same_segment = positions[..., 1:] != 0
    keep = loss[..., :-1] & same_segment
    labels[..., :-1] = np.where(keep, tokens[..., 1:], IGNORE_INDEX)
    return labels


def decode_row(words: np.ndarray, layout: DataLayout) -> dict[str, np.ndarray]:
    """Words of one row (or a batch of rows) -> model inputs."""
    tokens, positions, loss = layout.decode(words)
    return {
        "input_ids": tokens,
        "labels": decode_labels(tokens, positions, loss),
        "seq_idx": seq_idx_from_positions(positions),
    }


LAYOUT_FILENAME = "layout.json"  # beside index.json in every split folder
WORDS_COLUMN = "words"


@dataclass(frozen=True)
class ShardMeta:
    """What a reader needs to know about a split, written by data.prepare as layout.json."""

    layout: str
    seq_len: int
    tokenizer: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    mode: str = "pretrain"
    column: str = WORDS_COLUMN
    format_version: int = 1

    @property
    def data_layout(self) -> DataLayout:
        return get_layout(self.layout)

    def to_json(self) -> str:
        fields = dict(self.__dict__)
        layout = self.data_layout
        fields.update(dtype=layout.dtype_name, token_bits=layout.token_bits,
                      position_bits=layout.position_bits)
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | os.PathLike[str]) -> None:
        with open(os.path.join(folder, LAYOUT_FILENAME), "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardMeta:
        """Read layout.json; the bit fields it states must match the named layout."""
        try:
            with open(path) as f:
                obj = json.load(f)
            meta = cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{path}: unreadable shard layout file: {err}") from None
        layout = meta.data_layout
        stated = (obj.get("token_bits"), obj.get("position_bits"))
        if stated != (layout.token_bits, layout.position_bits):
            raise DataError(f"{path}: bit fields {stated} do not match layout {layout.name!r}")
        return meta
