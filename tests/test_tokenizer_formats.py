"""Tokenizers as people have them: SentencePiece .model files (NVIDIA's Mamba2 8B ships one) and
bare tokenizer.json files, each trained here, through prepare -> shards -> dataset rows and through
generate, evaluate and convert. The oracles are the sentencepiece / tokenizers libraries themselves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.dataset import PackedDataset
from data.errors import DataError
from data.prepare import main as prepare_main
from data.prepare import prepare
from data.tokenizer import SentencePieceTokenizer, TokenizersFileTokenizer, load_tokenizer

WORDS = ("state space model layer token mamba selective scan chunk kernel cache café naïve über "
         "straße 東京 データ ✓ 42 1024").split()
WIDE_SYMBOLS = 65_600  # user-defined symbols take ids 3..65602, so every ordinary piece lies above 65,535


def corpus_lines(count: int = 120) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 6)) for i in range(count)]


def train_sentencepiece(prefix: Path, *, wide: bool = False, eos_id: int = 2) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(prefix), model_type="bpe",
        vocab_size=(WIDE_SYMBOLS if wide else 0) + 420, character_coverage=1.0, byte_fallback=True,
        eos_id=eos_id, user_defined_symbols=[f"<sym{i}>" for i in range(WIDE_SYMBOLS)] if wide else [],
        minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_small(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "small")


@pytest.fixture(scope="module")
def sp_wide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nvidia_like")
    # an odd name, as NVIDIA's (mt_nlg_plus_..._256k.model): found because it is the folder's only .model
    return train_sentencepiece(folder / "corpus_frac_256k", wide=True)


def bare_tokenizer_json(folder: Path, specials: list[str]) -> Path:
    """A byte-level BPE trained by the tokenizers library, saved as tokenizer.json alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def stream_of(out: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, str]:
    """All rows of a split in order: (input_ids, labels) concatenated, and the layout's name."""
    dataset = PackedDataset(str(out), None, split, shuffle=False)
    rows = [dataset[i] for i in range(dataset.num_samples)]
    layout = json.loads((out / split / "layout.json").read_text())["layout"]
    ids = np.concatenate([r["input_ids"] for r in rows])
    return ids, np.concatenate([r["labels"] for r in rows]), layout


# ---- SentencePiece ---------------------------------------------------------------------------
def test_sentencepiece_round_trip_eos_and_no_bos(sp_small: Path) -> None:
    import sentencepiece as spm

    oracle = spm.SentencePieceProcessor(model_file=str(sp_small))
    tok = load_tokenizer(str(sp_small))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id) == (oracle.get_piece_size(), 2, 1)
    assert tok.pad_token_id == tok.eos_token_id  # no <pad> piece: EOS stands in (never in the loss)
    text = "mamba über 東京 ✓ scan 漢"  # 漢 is not in the training text: byte fallback
    ids = tok.encode(text)
    assert ids == oracle.encode(text) and oracle.bos_id() not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id]) == text  # control pieces decode to nothing
    assert tok.decode([*ids, tok.vocab_size + 3]) == text  # a padded model vocabulary's extra ids
    assert tok.encode_batch(["cache", ""]) == [oracle.encode("cache"), []]
    assert tok.encode("a\ud800b") == oracle.encode("a?b")  # a lone surrogate (a JSON escape) is replaced
    # the folder holding it, and an explicit EOS by piece or by id
    assert load_tokenizer(str(sp_small.parent)).name == str(sp_small)
    assert load_tokenizer(str(sp_small), eos_token="<unk>").eos_token_id == 0
    assert load_tokenizer(str(sp_small), eos_token=7).eos_token_id == 7
    with pytest.raises(DataError, match="EOS token '<nope>' is not a token of"):
        load_tokenizer(str(sp_small), eos_token="<nope>")


def test_sentencepiece_without_eos_needs_the_flag(tmp_path: Path) -> None:
    path = train_sentencepiece(tmp_path / "noeos", eos_id=-1)
    with pytest.raises(DataError, match="defines no EOS piece; name one with --eos-token"):
        load_tokenizer(str(path))
    assert load_tokenizer(str(path), eos_token="<s>").eos_token_id == 1


def test_wide_sentencepiece_through_prepare_shards_and_dataset(sp_wide: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import sentencepiece as spm

    oracle = spm.SentencePieceProcessor(model_file=str(sp_wide))
    docs = corpus_lines(40)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["--input", str(source), "--output", str(tmp_path / "out"), "--seq-len", "64", "--val-ratio", "0",
            "--tokenizer", str(sp_wide.parent), "--no-progress"]  # the folder holding the .model
    assert prepare_main(argv) == 0
    assert "layout int64" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "train" / "layout.json").read_text())
    assert meta["vocab_size"] == oracle.get_piece_size() > 65_536
    assert (meta["tokenizer"], meta["eos_token_id"]) == (str(sp_wide), oracle.eos_id())
    ids, labels, layout = stream_of(tmp_path / "out")
    assert layout == "int64"
    want = np.concatenate([np.array(oracle.encode(d) + [oracle.eos_id()]) for d in docs])
    assert ids[:len(want)].tolist() == want.tolist()
    assert (ids[len(want):] == oracle.eos_id()).all()  # padding (PAD = EOS here) only at the end
    assert (want[want != oracle.eos_id()] > 65_535).all()  # every text token needs the wide layout
    tok = load_tokenizer(meta["tokenizer"])  # how training reloads it for its sample
    first = ids[:len(oracle.encode(docs[0]))]
    assert tok.decode(first.tolist()) == docs[0]
    # labels are next tokens inside a row, never across a row cut
    seq = 64
    for t in range(len(want) - 1):
        if t % seq != seq - 1 and want[t] != oracle.eos_id():
            assert labels[t] == want[t + 1]
    with pytest.raises(DataError, match=r"vocab_size \d+ does not fit layout 'int32'"):
        prepare([str(source)], str(tmp_path / "o2"), 64, tokenizer=str(sp_wide), layout="int32",
                progress=False)


# ---- a bare tokenizer.json ---------------------------------------------------------------------
def test_bare_tokenizer_json_file_and_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = bare_tokenizer_json(tmp_path / "bare", ["<unk>", "<|endoftext|>", "<pad>"])
    oracle = Tokenizer.from_file(str(path))
    for where in (path, path.parent):  # the file, and a folder holding only it
        tok = load_tokenizer(str(where))
        assert isinstance(tok, TokenizersFileTokenizer)
        assert (tok.eos_token_id, tok.pad_token_id) == (1, 2)
        assert tok.vocab_size == oracle.get_vocab_size(with_added_tokens=True)
    text = "selective scan über ✓ caché"
    assert tok.encode(text) == oracle.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
    out = tmp_path / "out"
    docs = corpus_lines(10)
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    prepare([str(tmp_path / "d.txt")], str(out), 32, tokenizer=str(path.parent), lines_as_docs=True,
            val_ratio=0, progress=False)
    ids, _, layout = stream_of(out)
    want = [i for d in docs for i in [*oracle.encode(d, add_special_tokens=False).ids, 1]]
    assert layout == "int32" and ids[:len(want)].tolist() == want and (ids[len(want):] == 2).all()


def test_bare_tokenizer_json_without_eos_is_a_clear_error(tmp_path: Path) -> None:
    path = bare_tokenizer_json(tmp_path / "noeos", ["<unk>", "[SEP]"])
    with pytest.raises(DataError, match=r"no EOS among its special tokens \(<unk>, \[SEP\]; looked for "
                                        r"</s>.*\): name it with --eos-token"):
        load_tokenizer(str(path.parent))
    tok = load_tokenizer(str(path.parent), eos_token="[SEP]")
    assert tok.eos_token_id == 1 and tok.pad_token_id == 1
    with pytest.raises(DataError, match="EOS token '</s>' is not a token of"):
        load_tokenizer(str(path), eos_token="</s>")
    with pytest.raises(DataError, match="EOS id 9999 is outside tokenizer"):
        load_tokenizer(str(path), eos_token="9999")
    out = tmp_path / "out"
    (tmp_path / "d.txt").write_text("scan cache\n")
    argv = ["--input", str(tmp_path / "d.txt"), "--output", str(out), "--seq-len", "8", "--val-ratio", "0",
            "--tokenizer", str(path), "--eos-token", "[SEP]", "--no-progress"]
    assert prepare_main(argv) == 0
    assert json.loads((out / "train" / "layout.json").read_text())["eos_token_id"] == 1


def test_folders_without_a_tokenizer_and_ambiguous_ones(tmp_path: Path, sp_small: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.model", "b.model"):
        (two / name).write_bytes(sp_small.read_bytes())
    with pytest.raises(DataError, match=r"several SentencePiece models \(a.model, b.model\); name the file"):
        load_tokenizer(str(two))
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer("missing.model")
    with pytest.raises(DataError, match="byte tokenizer's EOS is fixed"):
        load_tokenizer("byte", eos_token="</s>")


# ---- generate, evaluate and convert with a SentencePiece model -------------------------------
def test_convert_generate_evaluate_with_a_sentencepiece_model(sp_small: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import sentencepiece as spm

    from mamba.convert import main as convert_main
    from mamba.evaluate import main as evaluate_main
    from mamba.generate import main as generate_main
    from mamba.model import MambaConfig, MambaLMHeadModel

    oracle = spm.SentencePieceProcessor(model_file=str(sp_small))
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=oracle.get_piece_size(),
                         pad_vocab_size_multiple=16, layer_pattern="Mm",
                         ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16})
    model = MambaLMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "native")
    # convert copies the .model into the output folder, where generate and evaluate find it
    assert convert_main(["--from", "native", str(tmp_path / "native"), "--to", "native", str(tmp_path / "m"),
                         "--tokenizer", str(sp_small)]) == 0
    assert (tmp_path / "m" / sp_small.name).read_bytes() == sp_small.read_bytes()
    prompt = "mamba scan"
    ids = torch.tensor([oracle.encode(prompt)])
    row = model.generate(ids, 6, eos_token_id=oracle.eos_id())[0, ids.shape[1]:].tolist()
    row = row[:row.index(oracle.eos_id())] if oracle.eos_id() in row else row
    capsys.readouterr()
    argv = [str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "6", "--no-stream"]
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == oracle.decode(row) + "\n"
    # evaluate with the tokenizer named explicitly (a folder holding the .model)
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"input": "cache?", "output": "kernel"}) + "\n")
    assert evaluate_main(["qa", str(tmp_path / "native"), "--data", str(data), "--tokenizer",
                          str(sp_small.parent), "--max-new-tokens", "4", "--out", str(tmp_path / "ev")]) == 0
    (pred,) = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    ids = torch.tensor([oracle.encode("Question: cache?\nAnswer: ")])
    row = model.generate(ids, 4, eos_token_id=oracle.eos_id())[0, ids.shape[1]:].tolist()
    row = row[:row.index(oracle.eos_id())] if oracle.eos_id() in row else row
    assert pred["pred"] == oracle.decode(row).strip()


def test_convert_tokenizer_folder_holding_a_sentencepiece_model(sp_wide: Path, tmp_path: Path) -> None:
    from mamba.convert import main as convert_main
    from mamba.model import MambaConfig, MambaLMHeadModel

    config = MambaConfig(d_model=16, n_layer=1, vocab_size=8, layer_pattern="M",
                         ssm_cfg={"d_state": 8, "headdim": 8, "chunk_size": 16})
    MambaLMHeadModel(config).save_pretrained(tmp_path / "native")
    # NVIDIA's release folder: the .model under its own name beside other files
    assert convert_main(["--from", "native", str(tmp_path / "native"), "--to", "native", str(tmp_path / "m"),
                         "--tokenizer", str(sp_wide.parent)]) == 0
    assert (tmp_path / "m" / sp_wide.name).read_bytes() == sp_wide.read_bytes()
    assert load_tokenizer(str(tmp_path / "m")).vocab_size == WIDE_SYMBOLS + 420
    (tmp_path / "empty").mkdir()
    assert convert_main(["--from", "native", str(tmp_path / "native"), "--to", "native", str(tmp_path / "m2"),
                         "--tokenizer", str(tmp_path / "empty")]) == 2  # nothing to copy is an error
