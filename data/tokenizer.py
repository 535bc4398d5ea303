"""Tokenizers behind one small interface: the built-in byte-level one, Hugging Face folders and
hub names, SentencePiece ``.model`` files and bare ``tokenizer.json`` files.

The byte tokenizer needs no download, so the bundled corpus, the tests and the tiny default
config work offline. Ids 0-255 are the UTF-8 bytes, then the special tokens.

:func:`load_tokenizer` takes ``'byte'``, a file or folder, or a hub name. A file ending in
``.model`` is SentencePiece, one ending in ``.json`` is a ``tokenizers`` file. A folder is a
Hugging Face tokenizer if it has ``tokenizer_config.json``, else its ``tokenizer.json``, else
its one SentencePiece ``.model`` file. ``eos_token`` (the CLIs' ``--eos-token``) overrides the
EOS a tokenizer declares, and names one where none is declared.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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

    def __init__(self, name_or_path: str, eos_token: str | int | None = None) -> None:
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
        self._tok = tok
        self.name = name_or_path
        self.vocab_size = len(tok)
        if eos_token is not None:
            self.eos_token_id = _explicit_eos(eos_token, tok.get_vocab().get, self.vocab_size, name_or_path)
        elif tok.eos_token_id is not None:
            self.eos_token_id = int(tok.eos_token_id)
        else:
            raise DataError(f"tokenizer {name_or_path!r} has no EOS token (documents need one): "
                            "name it with --eos-token")
        # Padding never enters the loss, so EOS is a safe stand-in when there is no PAD.
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self._tok(_valid_utf8(texts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (NVIDIA's Mamba2 8B ships one, 256k pieces).

    Like Megatron's GPT SentencePiece tokenizer, encoding adds neither BOS nor EOS (data.prepare
    appends EOS to each document itself); decoding drops the control pieces (BOS, EOS, PAD).
    """

    def __init__(self, path: Path, eos_token: str | int | None = None) -> None:
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise DataError(f"cannot load tokenizer {str(path)!r}: not a SentencePiece model "
                            f"({error})") from None
        self._sp = sp
        self.name = str(path)
        self.vocab_size = int(sp.get_piece_size())
        if eos_token is not None:
            self.eos_token_id = _explicit_eos(eos_token, self._piece_id, self.vocab_size, self.name)
        elif sp.eos_id() >= 0:
            self.eos_token_id = int(sp.eos_id())
        else:
            raise DataError(f"tokenizer {self.name!r} defines no EOS piece; name one with --eos-token")
        self.bos_token_id = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.pad_token_id = int(sp.pad_id()) if sp.pad_id() >= 0 else self.eos_token_id

    def _piece_id(self, piece: str) -> int | None:
        found = int(self._sp.piece_to_id(piece))  # unknown pieces map to <unk>: check the round trip
        return found if self._sp.id_to_piece(found) == piece else None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self._sp.encode(_valid_utf8(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        # A model's vocabulary is often padded past the tokenizer's; such ids have no piece.
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class TokenizersFileTokenizer:
    """A bare ``tokenizer.json`` written by the ``tokenizers`` library (no tokenizer_config.json).

    Such a file does not say which token is EOS: ``eos_token`` names it, else the first of
    :data:`EOS_TOKENS` among the file's special tokens is used.
    """

    def __init__(self, path: Path, eos_token: str | int | None = None) -> None:
        from tokenizers import Tokenizer as CoreTokenizer

        try:
            tok = CoreTokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise DataError(f"cannot load tokenizer {str(path)!r}: not a tokenizers JSON file "
                            f"({error})") from None
        self._tok = tok
        self.name = str(path)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        if eos_token is not None:
            self.eos_token_id = _explicit_eos(eos_token, tok.token_to_id, self.vocab_size, self.name)
        else:
            eos = next((specials[t] for t in EOS_TOKENS if t in specials), None)
            if eos is None:
                raise DataError(f"tokenizer {self.name!r} has no EOS among its special tokens "
                                f"({', '.join(specials) or 'none'}; looked for {', '.join(EOS_TOKENS)}): "
                                "name it with --eos-token")
            self.eos_token_id = int(eos)
        pad = next((specials[t] for t in PAD_TOKENS if t in specials), None)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(e.ids) for e in self._tok.encode_batch(_valid_utf8(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                                skip_special_tokens=False)


EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<EOS>")
PAD_TOKENS = ("<pad>", "<|padding|>", "<|pad|>", "[PAD]", "<PAD>")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _valid_utf8(texts: Sequence[str]) -> list[str]:
    """Lone surrogates (legal in JSON escapes) cannot cross into Rust or C++; replace them."""
    out = list(texts)
    for i, text in enumerate(out):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            out[i] = text.encode("utf-8", "replace").decode("utf-8")
    return out


def _explicit_eos(eos_token: str | int, lookup: Callable[[str], int | None], vocab_size: int,
                  name: str) -> int:
    """``eos_token`` as a token of the tokenizer, else (all digits, or an int) as an id."""
    found = lookup(eos_token) if isinstance(eos_token, str) else None
    if found is None and (isinstance(eos_token, int) or eos_token.isdigit()):
        found = int(eos_token)
        if not 0 <= found < vocab_size:
            raise DataError(f"EOS id {found} is outside tokenizer {name!r} (ids 0-{vocab_size - 1})")
    if found is None:
        raise DataError(f"EOS token {eos_token!r} is not a token of {name!r}; give a token it has, or an id")
    return int(found)


def _sentencepiece_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.model") if p.is_file())


def tokenizer_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files that make up the tokenizer at ``path`` (a file, or those of a folder; maybe none)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"tokenizer {str(path)!r} does not exist")
    files = [path / name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
    return files + [p for p in _sentencepiece_files(path) if p not in files]


def locate_tokenizer(path: Path) -> tuple[str, Path]:
    """``(kind, path)`` for a local tokenizer file or folder; kind is hf, sentencepiece or tokenizers."""
    if path.is_file():
        if path.suffix == ".model":
            return "sentencepiece", path
        if path.name == "tokenizer_config.json":
            return "hf", path.parent
        if path.suffix == ".json":
            return "tokenizers", path
        raise DataError(f"tokenizer file {str(path)!r} is neither a SentencePiece .model nor a tokenizers "
                        ".json file; or give its folder")
    if (path / "tokenizer_config.json").is_file():
        return "hf", path
    if (path / "tokenizer.json").is_file():
        return "tokenizers", path / "tokenizer.json"
    models = _sentencepiece_files(path)
    if len(models) > 1:
        if (path / "tokenizer.model").is_file():
            return "sentencepiece", path / "tokenizer.model"
        names = ", ".join(p.name for p in models)
        raise DataError(f"tokenizer folder {str(path)!r} holds several SentencePiece models ({names}); "
                        "name the file")
    if models:
        return "sentencepiece", models[0]
    if any((path / name).is_file() for name in ("config.json", "vocab.json")):
        return "hf", path  # let transformers try its older layouts
    raise DataError(f"cannot load tokenizer {str(path)!r}: the folder holds no tokenizer files "
                    "(tokenizer.json, tokenizer_config.json or a SentencePiece .model)")


def load_tokenizer(name_or_path: str = BYTE_TOKENIZER_NAME, eos_token: str | int | None = None) -> Tokenizer:
    """``'byte'``, a local tokenizer file or folder (see the module doc), or a Hugging Face hub name."""
    if name_or_path == BYTE_TOKENIZER_NAME:
        if eos_token is not None and str(eos_token) != str(ByteTokenizer.eos_token_id):
            raise DataError(f"EOS token {eos_token!r}: the byte tokenizer's EOS is fixed "
                            f"({ByteTokenizer.eos_token_id}); drop --eos-token")
        return ByteTokenizer()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix in (".model", ".json"):
            raise DataError(f"tokenizer {name_or_path!r} does not exist (a file or folder)")
        return HFTokenizer(name_or_path, eos_token)  # a hub name
    kind, found = locate_tokenizer(path.absolute())
    if kind == "sentencepiece":
        return SentencePieceTokenizer(found, eos_token)
    if kind == "tokenizers":
        return TokenizersFileTokenizer(found, eos_token)
    return HFTokenizer(str(found), eos_token)


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


def init_worker(name_or_path: str, eos_token: str | int | None = None) -> None:
    global _worker_tokenizer
    # Each worker is one process already; HF's own thread pool would oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_tokenizer is None or _worker_tokenizer.name != name_or_path:  # spawned, not forked
        _worker_tokenizer = load_tokenizer(name_or_path, eos_token)


def worker_tokenize_chunk(chunk: Chunk) -> list[Any]:
    assert _worker_tokenizer is not None, "init_worker was not called"
    return tokenize_chunk(_worker_tokenizer, chunk)
