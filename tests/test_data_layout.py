"""DataLayout words: round trips, overflow errors, labels and seq_idx."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import DataError
from data.layout import (
    DEFAULT,
    IGNORE_INDEX,
    WIDE,
    DataLayout,
    LayoutOverflowError,
    ShardMeta,
    choose_layout,
    decode_labels,
    decode_row,
    seq_idx_from_positions,
)


@st.composite
def words_for(draw: st.DrawFn, layout: DataLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 64))
    ints = st.integers(0, layout.max_vocab_size - 1)
    tokens = draw(st.lists(ints, min_size=n, max_size=n))
    positions = draw(st.lists(st.integers(0, layout.max_seq_len - 1), min_size=n, max_size=n))
    loss = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return np.array(tokens, np.int64), np.array(positions, np.int64), np.array(loss, bool)


@pytest.mark.parametrize("layout", [DEFAULT, WIDE], ids=lambda layout: layout.name)
def test_round_trip(layout: DataLayout) -> None:
    @settings(max_examples=150, deadline=None)
    @given(words_for(layout))
    def check(fields: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        tokens, positions, loss = fields
        words = layout.encode(tokens, positions, loss)
        assert words.dtype == layout.dtype
        assert (words >= 0).all()  # the sign bit stays clear
        got_tokens, got_positions, got_loss = layout.decode(words)
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got_positions, positions)
        np.testing.assert_array_equal(got_loss, loss)

    check()


def test_default_bit_positions_are_exact() -> None:
    word = DEFAULT.encode(np.array([0xABCD]), np.array([0x1234]), np.array([True]))[0]
    assert int(word) == 0xABCD | (0x1234 << 16) | (1 << 30)
    assert DEFAULT.dtype == np.int32 and DEFAULT.max_vocab_size == 65_536 and DEFAULT.max_seq_len == 16_384
    wide = WIDE.encode(np.array([70_000]), np.array([5]), np.array([True]))[0]
    assert int(wide) == 70_000 | (5 << 32) | (1 << 62)
    assert WIDE.dtype == np.int64


@pytest.mark.parametrize("layout", [DEFAULT, WIDE], ids=lambda layout: layout.name)
def test_overflow_raises(layout: DataLayout) -> None:
    @settings(max_examples=50, deadline=None)
    @given(st.integers(layout.max_vocab_size, 2**40), st.integers(layout.max_seq_len, 2**40))
    def check(bad_token: int, bad_position: int) -> None:
        with pytest.raises(LayoutOverflowError, match=f"token id {bad_token} .*{layout.max_vocab_size}"):
            layout.encode(np.array([1, bad_token]), np.array([0, 1]), np.array([True, True]))
        with pytest.raises(LayoutOverflowError, match=f"position {bad_position} .*{layout.max_seq_len}"):
            layout.encode(np.array([1, 2]), np.array([0, bad_position]), np.array([True, True]))

    check()
    with pytest.raises(LayoutOverflowError, match="token id -1"):
        layout.encode(np.array([-1]), np.array([0]), np.array([False]))


def test_overflow_names_the_wide_layout() -> None:
    with pytest.raises(LayoutOverflowError, match=r"token id 65536 .*65536.*'int64'"):
        DEFAULT.encode(np.array([65_536]), np.array([0]), np.array([True]))
    with pytest.raises(LayoutOverflowError, match=r"vocab_size 256000 .*65536.*'int64'"):
        choose_layout("int32", 256_000, 2048)
    with pytest.raises(LayoutOverflowError, match=r"seq_len 16385 .*16384.*'int64'"):
        choose_layout("int32", 50_000, 16_385)


def test_choose_layout_auto() -> None:
    assert choose_layout("auto", 65_536, 16_384) is DEFAULT
    assert choose_layout("auto", 65_537, 2048) is WIDE  # e.g. 128k and 256k vocabularies
    assert choose_layout("auto", 258, 32_768) is WIDE
    with pytest.raises(DataError, match="unknown layout"):
        choose_layout("int16", 10, 10)


def test_seq_idx_and_labels_follow_documented_rules() -> None:
    # Row: doc A = [10, 11, EOS], doc B = [20, 21] continuing into the next row, 2 loss bits off.
    tokens = np.array([10, 11, 99, 20, 21, 22])
    positions = np.array([0, 1, 2, 0, 1, 2])
    loss = np.array([1, 1, 0, 1, 0, 1], bool)
    np.testing.assert_array_equal(seq_idx_from_positions(positions), [0, 0, 0, 1, 1, 1])
    labels = decode_labels(tokens, positions, loss)
    # 10->11, 11->EOS learned; EOS (bit 0) no label; 20->21; bit 0 at 21; the last token's
    # target lies in the next row.
    np.testing.assert_array_equal(labels, [11, 99, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX])
    # A set loss bit never crosses a document start.
    labels = decode_labels(tokens, positions, np.ones(6, bool))
    assert labels[2] == IGNORE_INDEX


def test_decode_row_batched_matches_reference() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65_536, (4, 32))
    starts = rng.random((4, 32)) < 0.2
    starts[:, 0] = True
    positions = np.zeros((4, 32), np.int64)
    for r in range(4):
        for t in range(1, 32):
            positions[r, t] = 0 if starts[r, t] else positions[r, t - 1] + 1
    loss = rng.random((4, 32)) < 0.7
    out = decode_row(DEFAULT.encode(tokens, positions, loss), DEFAULT)
    assert out["input_ids"].dtype == np.int64 and out["labels"].dtype == np.int64
    assert out["seq_idx"].dtype == np.int32
    for r in range(4):
        expect_seq = np.cumsum(starts[r]) - 1
        np.testing.assert_array_equal(out["seq_idx"][r], expect_seq)
        for t in range(32):
            ok = t + 1 < 32 and loss[r, t] and not starts[r, t + 1]
            assert out["labels"][r, t] == (tokens[r, t + 1] if ok else IGNORE_INDEX)


def test_shard_meta_round_trip_and_checks(tmp_path) -> None:
    meta = ShardMeta(layout="int64", seq_len=128, tokenizer="x", vocab_size=131_072, eos_token_id=2,
                     pad_token_id=0, mode="instruct")
    meta.save(tmp_path)
    assert ShardMeta.load(tmp_path / "layout.json") == meta
    text = (tmp_path / "layout.json").read_text().replace('"token_bits": 32', '"token_bits": 16')
    (tmp_path / "layout.json").write_text(text)
    with pytest.raises(DataError, match="do not match layout 'int64'"):
        ShardMeta.load(tmp_path / "layout.json")
