"""data.prepare end to end: real inputs -> real MDS shards -> real PackedDataset rows."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.dataset import PackedDataset
from data.errors import DataError
from data.layout import IGNORE_INDEX
from data.prepare import TEMPLATES, is_val_document, main, prepare

EOS, PAD = 256, 257  # byte tokenizer specials
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_split(out: Path, split: str) -> list[dict[str, np.ndarray]]:
    dataset = PackedDataset(str(out), None, split, shuffle=False)
    return [dataset[i] for i in range(dataset.num_samples)]


def random_docs(seed: int, count: int, max_len: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefgh ijklmn\nopqé✓"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len))) for _ in range(count)]


def expected_rows(docs: list[str], seq_len: int) -> list[dict[str, list[int]]]:
    """Reference packing written as plainly as possible, to check the vectorised code."""
    stream: list[tuple[int, bool, bool]] = []  # (token, starts a document, loss bit)
    for doc in docs:
        ids = list(doc.encode("utf-8")) + [EOS]
        stream += [(t, i == 0, i < len(ids) - 1) for i, t in enumerate(ids)]
    if len(stream) % seq_len:
        pad = seq_len - len(stream) % seq_len
        stream += [(PAD, i == 0, False) for i in range(pad)]
    rows = []
    for r in range(0, len(stream), seq_len):
        row = stream[r:r + seq_len]
        seq_idx, labels, current = [], [], -1
        for t, (_, starts, loss) in enumerate(row):
            current += 1 if (t == 0 or starts) else 0
            seq_idx.append(current)
            same_doc = t + 1 < seq_len and not row[t + 1][1]
            labels.append(row[t + 1][0] if loss and same_doc else IGNORE_INDEX)
        rows.append({"input_ids": [tok for tok, _, _ in row], "seq_idx": seq_idx, "labels": labels})
    return rows


def test_pretrain_round_trip(tmp_path: Path) -> None:
    docs = random_docs(0, 60, 90) + [""]  # rows of 32: many documents span rows
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    summary = prepare([str(source)], str(out), 32, val_ratio=0.2, shard_size=1 << 11, progress=False)
    kept = docs[:-1]
    split_of = {"train": [], "val": []}
    for i, doc in enumerate(kept):
        split_of["val" if is_val_document(i, 0.2) else "train"].append(doc)
    assert 5 <= len(split_of["val"]) <= 20 and summary.skipped_empty == 1
    assert len(list((out / "train").glob("shard.*.mds.zstd"))) > 1  # several shards, in order
    for split, split_docs in split_of.items():
        rows = read_split(out, split)
        want = expected_rows(split_docs, 32)
        assert len(rows) == len(want) == summary.splits[split].rows
        for got, expect in zip(rows, want, strict=True):
            assert got["input_ids"].dtype == np.int64 and got["seq_idx"].dtype == np.int32
            assert got["input_ids"].tolist() == expect["input_ids"]
            assert got["seq_idx"].tolist() == expect["seq_idx"]
            assert got["labels"].tolist() == expect["labels"]
        stats = summary.splits[split]
        assert stats.documents == len(split_docs)
        assert stats.tokens == sum(len(d.encode()) + 1 for d in split_docs)
        assert stats.tokens + stats.padding == 32 * stats.rows
        assert stats.loss_tokens == sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in want)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["splits"]["train"]["rows"] == summary.splits["train"].rows
    assert not list(tmp_path.glob(".out.*"))  # the temporary folder was moved, not copied


def test_instruct_loss_only_on_answers(tmp_path: Path) -> None:
    records = [{"input": f"q{i}" * (i % 4 + 1), "output": f"A{i}"} for i in range(20)]
    records[3] = {"prompt": "p3", "response": "r3"}  # the other accepted field names
    records.append({"input": "x" * 100, "output": "too long for a row"})
    source = write_jsonl(tmp_path / "qa.jsonl", records)
    for pack in (True, False):
        out = tmp_path / f"out-{pack}"
        summary = prepare([str(source)], str(out), 48, mode="instruct", pack=pack, val_ratio=0.0,
                          progress=False)
        assert not (out / "val").exists()
        stats = summary.splits["train"]
        assert (stats.documents, stats.too_long) == (20, 1)
        rows = read_split(out, "train")
        assert len(rows) == (20 if not pack else stats.rows) and (len(rows) < 20) == pack
        answers, prompts = [], []
        for row in rows:
            ids, labels, seq_idx = row["input_ids"], row["labels"], row["seq_idx"]
            for doc in np.unique(seq_idx):
                in_doc = seq_idx == doc
                doc_ids, doc_labels = ids[in_doc], labels[in_doc]
                if doc_ids[0] == PAD:
                    assert (doc_labels == IGNORE_INDEX).all()
                    continue
                text = bytes(doc_ids[doc_ids < 256].tolist()).decode()
                learned = doc_labels[doc_labels != IGNORE_INDEX]
                assert learned[-1] == EOS  # the answer's end is learned
                answer = bytes(learned[:-1].tolist()).decode()
                assert text.endswith(answer)
                prompts.append(text[: len(text) - len(answer)])
                answers.append(answer)
        expected = [(r.get("input", r.get("prompt")), r.get("output", r.get("response")))
                    for r in records[:20]]
        assert answers == [a for _, a in expected]
        assert prompts == [TEMPLATES["qa"].format(input=q) for q, _ in expected]


def test_text_parquet_and_saved_hf_dataset_inputs(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\nstill first")
    (folder / "sub" / "b.md").write_text("second file")
    (folder / ".hidden").write_text("never read")
    lines = tmp_path / "lines.txt"
    lines.write_text("line one\n\nline two\r\n")
    pq.write_table(pa.table({"body": ["pq one", "pq two"]}), tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"body": ["hf one"]}).save_to_disk(str(tmp_path / "hfdisk"))

    def docs_of(out: Path) -> list[str]:
        ids = np.concatenate([r["input_ids"] for r in read_split(out, "train")])
        return [bytes(ids[s:e].tolist()).decode() for s, e in _doc_spans(ids)]

    prepare([str(folder)], str(tmp_path / "o1"), 16, val_ratio=0, progress=False)
    assert docs_of(tmp_path / "o1") == ["first file\nstill first", "second file"]
    prepare([str(lines)], str(tmp_path / "o2"), 16, lines_as_docs=True, val_ratio=0, progress=False)
    assert docs_of(tmp_path / "o2") == ["line one", "line two"]
    prepare([str(tmp_path / "t.parquet"), str(tmp_path / "hfdisk")], str(tmp_path / "o3"), 16,
            text_field="body", val_ratio=0, progress=False)
    assert docs_of(tmp_path / "o3") == ["pq one", "pq two", "hf one"]


def _doc_spans(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each document's text in a concatenated stream, EOS excluded."""
    ends = np.flatnonzero(ids == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def test_parallel_tokenization_and_val_input(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in random_docs(1, 1500, 40)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out"}])
    one = prepare([str(source)], str(tmp_path / "one"), 64, val_inputs=[str(val)], progress=False)
    two = prepare([str(source)], str(tmp_path / "two"), 64, val_inputs=[str(val)], num_proc=2, progress=False)
    assert one.splits["train"] == two.splits["train"] and two.splits["val"].documents == 1
    rows_one, rows_two = read_split(tmp_path / "one", "train"), read_split(tmp_path / "two", "train")
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["input_ids"].tolist() == b["input_ids"].tolist()


# The parent answers SIGTERM in Python without exiting (as Composer's handler runs Python code, here
# long): the tokenizer workers it forks must still die at once on SIGTERM, as Pool.terminate() sends.
SLOW_SIGTERM_PARENT = """
import multiprocessing, os, signal, sys, time
from data.prepare import tokenizer_pool
signal.signal(signal.SIGTERM, lambda *a: time.sleep(3600))
both = multiprocessing.get_context("fork").Barrier(3)  # inherited by the forked workers

def ready(_):
    both.wait(timeout=60)  # each worker holds one task: both have run their initializer
    return os.getpid()

pool = tokenizer_pool(2, ("byte", None))
started = pool.map_async(ready, [0, 1], chunksize=1)
both.wait(timeout=60)
started.get(timeout=60)
workers = list(pool._pool)  # the pool replaces workers that die: keep these
for p in workers:
    os.kill(p.pid, signal.SIGTERM)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and any(p.exitcode is None for p in workers):
    time.sleep(0.05)
print("exitcodes", [p.exitcode for p in workers], flush=True)
os.killpg(0, signal.SIGKILL)  # this process and every worker (the test starts it in its own group)
"""


def test_tokenizer_workers_die_on_sigterm_whatever_the_parent_installed() -> None:
    proc = subprocess.run([sys.executable, "-c", SLOW_SIGTERM_PARENT], cwd=REPO, capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    assert "exitcodes [-15, -15]" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def make_word_tokenizer(folder: Path, num_words: int) -> Path:
    """A word-level HF tokenizer ("w0" .. "w{n-1}" plus <unk>, <pad>, </s>), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(num_words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(str(folder))
    return folder


def test_large_vocab_picks_the_wide_layout(tmp_path: Path) -> None:
    tok = make_word_tokenizer(tmp_path / "tok", 70_000)
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w69999 w65533"}, {"text": "w70000 w7"}])
    summary = prepare([str(source)], str(tmp_path / "out"), 8, tokenizer=str(tok), val_ratio=0,
                      progress=False)
    assert summary.layout == "int64"
    meta = json.loads((tmp_path / "out" / "train" / "layout.json").read_text())
    assert (meta["layout"], meta["vocab_size"], meta["eos_token_id"]) == ("int64", 70_003, 2)
    (row,) = read_split(tmp_path / "out", "train")
    assert row["input_ids"].tolist() == [4, 70_002, 65_536, 2, 0, 10, 2, 1]  # w70000 is <unk> = 0
    with pytest.raises(DataError, match="vocab_size 70003 .*'int64'"):
        prepare([str(source)], str(tmp_path / "o2"), 8, tokenizer=str(tok), layout="int32", progress=False)
    assert not (tmp_path / "o2").exists()


BAD_INPUTS = [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "pretrain", r"bad.jsonl:2: invalid JSON"),
    ("bad.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', "pretrain",
     r"bad.jsonl:3: missing field 'text' \(fields: body"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": 5}\n', "pretrain",
     r"bad.jsonl:2: field 'text' must be a string"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "pretrain", r"bad.jsonl:2: undecodable bytes"),
    ("bad.txt", b"fine\nfine\n\xc3\x28 broken\n", "pretrain", r"bad.txt:3: undecodable bytes"),
    ("bad.jsonl", b'{"input": "q", "output": "a"}\n{"input": "q"}\n', "instruct",
     r"bad.jsonl:2: missing field: need 'input' and 'output' \(or 'prompt' and 'response'\)"),
    ("bad.jsonl", b'[{"text": "a"}]\n', "pretrain", r"bad.jsonl:1: expected a JSON object"),
]


@pytest.mark.parametrize(("name", "content", "mode", "message"), BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path: Path, name: str, content: bytes, mode: str,
                                                      message: str) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x" * 5000, "input": "q", "output": "a"}] * 20)
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "new" / "deeper" / "out"  # parents that prepare has to create
    with pytest.raises(DataError, match=message):
        # The good file comes first, so shards are already being written when the bad line is read.
        prepare([str(good), str(bad)], str(out), 64, mode=mode, shard_size=1 << 12, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.jsonl", name])


def test_bad_parquet_and_dataset_rows_name_the_row(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["fine", None]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: needs column 'text' \(columns: body\)"):
        prepare([str(tmp_path / "t.parquet")], str(tmp_path / "o"), 8, progress=False)
    with pytest.raises(DataError, match=r"t.parquet: row 2: field 'body' must be a string, got NoneType"):
        prepare([str(tmp_path / "t.parquet")], str(tmp_path / "o"), 8, text_field="body", progress=False)
    records = {"input": ["q1", "q2"], "answer": ["a", "b"]}
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf: row 1: missing field: need 'input' and 'output'"):
        prepare([str(tmp_path / "hf")], str(tmp_path / "o"), 8, mode="instruct", progress=False)
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(DataError, match=r"notes.txt: instruction mode reads JSONL, Parquet or datasets"):
        prepare([str(tmp_path / "notes.txt")], str(tmp_path / "o"), 8, mode="instruct", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("line", "problem"), [
    (b'{"text": "a raw\ttab"}', "Invalid control character at column 16"),
    (b'{"text": "never closed}', "Unterminated string starting at column 10"),
    (b'{"text": "two" "values"}', "Expecting ',' delimiter at column 16"),
])
def test_invalid_json_line_is_one_clean_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                line: bytes, problem: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    argv = ["--input", str(bad), "--output", str(tmp_path / "o"), "--seq-len", "8", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {bad}:2: invalid JSON: {problem}\n"  # json says "... at"


def test_skip_bad_counts_and_continues(tmp_path: Path) -> None:
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(b'{"text": "one"}\n{oops\n{"other": 1}\n\xff\n{"text": "two"}\n')
    summary = prepare([str(bad)], str(tmp_path / "out"), 8, skip_bad=True, val_ratio=0, progress=False)
    assert summary.skipped_bad == 3 and summary.splits["train"].documents == 2
    assert "mixed.jsonl:2: invalid JSON" in summary.bad_examples[0]
    assert "skipped 3 bad records" in summary.format()


def test_output_is_never_overwritten_silently(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        prepare([str(source)], str(out), 8, val_ratio=0, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    prepare([str(source)], str(out), 8, val_ratio=0, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "train"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    argv = ["--input", str(bad), "--output", str(tmp_path / "o"), "--seq-len", "8", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.jsonl:2: invalid JSON" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    # The real command line, in a fresh interpreter: no traceback, exit code 2.
    run = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "missing.txt"),
                          "--output", str(tmp_path / "o"), "--seq-len", "8"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


def test_cli_success_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", [{"input": "2+2?", "output": "4"}] * 10)
    argv = ["--input", str(source), "--output", str(tmp_path / "o"), "--seq-len", "32", "--mode", "instruct",
            "--no-pack", "--template", "Q: {input}\nA: ", "--val-ratio", "0.1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    n_val = sum(is_val_document(i, 0.1) for i in range(10))
    assert 1 <= n_val <= 2 and f"val   documents {n_val} " in printed
    assert f"train documents {10 - n_val} " in printed and "tokens/s" in printed
    row = read_split(tmp_path / "o", "val")[0]
    assert bytes(row["input_ids"][:12].tolist()) == b"Q: 2+2?\nA: 4"
