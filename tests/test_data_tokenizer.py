"""The built-in byte tokenizer and the Hugging Face wrapper (a tokenizer built offline)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.errors import DataError
from data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenize_chunk


def make_word_tokenizer(folder: Path, num_words: int) -> Path:
    """A word-level HF tokenizer ("w0" .. "w{n-1}" plus <unk>, <pad>, </s>), saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(num_words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (258, 256, 257)
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_token_id]) == text  # specials decode to nothing
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    assert tok.encode_batch(["a", ""]) == [[97], []]


def test_tokenize_chunk_docs_and_pairs() -> None:
    tok = ByteTokenizer()
    docs = tokenize_chunk(tok, ["ab", "c"])
    assert [d.tolist() for d in docs] == [[97, 98], [99]]
    pairs = tokenize_chunk(tok, [("Q", "A")])
    assert [(p.tolist(), a.tolist()) for p, a in pairs] == [([81], [65])]


def test_hf_tokenizer_from_local_folder(tmp_path: Path) -> None:
    folder = make_word_tokenizer(tmp_path / "tok", 10)
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (13, 2, 1)
    assert tok.encode("w0 w9 nope") == [3, 12, 0]  # no BOS/EOS added: prepare adds EOS itself
    assert tok.decode([3, 12]) == "w0 w9"
    arrays = tokenize_chunk(tok, ["w1 w2", "w3"])
    assert [a.tolist() for a in arrays] == [[4, 5], [6]] and arrays[0].dtype == np.int64


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(empty))
