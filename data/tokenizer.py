"""Tokenizers behind one small interface: a built-in byte-level one and Hugging Face ones.

The byte tokenizer needs no download, so the bundled corpus, the tests and the tiny default
config work offline. Ids 0-255 are the UTF-8 bytes, then the special tokens.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data.errors import DataError

BYTE_TOKENIZER_NAME = "byte"


class Tokenizer(Protocol):
    """What data.prepare and evaluation code need from a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then EOS = 256 and PAD = 257 (vocab_size 258)."""

    name = BYTE_TOKENIZER_NAME
    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        # "surrogatepass" so a lone surrogate (possible in JSON "\udxxx" escapes) cannot crash
        # a long prepare run; it becomes its raw bytes.
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raw = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return raw.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (AutoTokenizer) by hub name or local folder."""

    def __init__(self, name_or_path: str) -> None:
        # transformers is imported lazily: the byte tokenizer must work without it.
        from transformers import AutoTokenizer

        try:
            tok: Any = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds
            raise DataError(
                f"cannot load tokenizer {name_or_path!r} (a Hugging Face name needs the network "
                f"or a local cache; a folder needs tokenizer files; or use 'byte'): "
                f"{type(error).__name__}: {error}"
            ) from None
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer {name_or_path!r} has no EOS token; documents need one")
        self._tok = tok
        self.name = name_or_path
        self.vocab_size = len(tok)
        self.eos_token_id = int(tok.eos_token_id)
        # Padding never enters the loss, so EOS is a safe stand-in when there is no PAD.
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            encoded = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        except UnicodeEncodeError:
            # Lone surrogates (legal in JSON escapes) cannot cross into Rust; replace them.
            clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
            encoded = self._tok(clean, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(name_or_path: str = BYTE_TOKENIZER_NAME) -> Tokenizer:
    """``'byte'`` for the built-in tokenizer, otherwise a Hugging Face name or local folder."""
    if name_or_path == BYTE_TOKENIZER_NAME:
        return ByteTokenizer()
    if name_or_path.startswith(("/", "./", "../", "~")):  # clearly a path, not a hub name
        if not Path(name_or_path).expanduser().exists():
            raise DataError(f"tokenizer folder {name_or_path!r} does not exist")
        name_or_path = str(Path(name_or_path).expanduser())
    return HFTokenizer(name_or_path)


# --- tokenization jobs for data.prepare's worker processes -----------------------------------
# They live here, not in data.prepare, so that a spawned worker (the start method off Linux)
# imports numpy and this module only.

Chunk = list[str] | list[tuple[str, str]]
_worker_tokenizer: Tokenizer | None = None


def tokenize_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: bytes are the ids
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), np.uint8) for t in texts]
    return [np.asarray(ids, np.int64) for ids in tokenizer.encode_batch(texts)]


def tokenize_chunk(tokenizer: Tokenizer, chunk: Chunk) -> list[Any]:
    """Documents -> token arrays; ``(prompt, answer)`` pairs -> pairs of token arrays."""
    if chunk and isinstance(chunk[0], tuple):
        prompts = tokenize_texts(tokenizer, [p for p, _ in chunk])
        answers = tokenize_texts(tokenizer, [a for _, a in chunk])
        return list(zip(prompts, answers, strict=True))
    return tokenize_texts(tokenizer, chunk)  # type: ignore[arg-type]


def share_with_workers(tokenizer: Tokenizer) -> None:
    """Hand a loaded tokenizer to forked workers, which inherit it instead of loading it again."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def init_worker(name_or_path: str) -> None:
    global _worker_tokenizer
    # Each worker is one process already; HF's own thread pool would oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_tokenizer is None or _worker_tokenizer.name != name_or_path:  # spawned, not forked
        _worker_tokenizer = load_tokenizer(name_or_path)


def worker_tokenize_chunk(chunk: Chunk) -> list[Any]:
    assert _worker_tokenizer is not None, "init_worker was not called"
    return tokenize_chunk(_worker_tokenizer, chunk)
