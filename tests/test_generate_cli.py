"""`python -m mamba.generate` end to end on a tiny saved model and the byte tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import ByteTokenizer
from mamba.generate import SamplingOptions, apply_template, generate_texts, load_model
from mamba.model import MambaConfig, MambaLMHeadModel

ROOT = Path(__file__).resolve().parents[1]
EOS = ByteTokenizer.eos_token_id
PROMPTS = ["Hello there", "A", "Question: what is 2 plus 2?", "xyz \u00e9\u00e8"]


def tiny_model(seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=258, layer_pattern="M*", tie_embeddings=False,
                         ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16}, attn_cfg={"num_heads": 2})
    return MambaLMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model"
    tiny_model().save_pretrained(path)
    return path


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mamba.generate", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def reference(model, prompt: str, steps: int, stop_at_eos: bool = True) -> str:
    """One prompt alone through the model API, decoded like the CLI."""
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    row = model.generate(ids, steps)[0, ids.shape[1]:].tolist()
    if stop_at_eos and EOS in row:
        row = row[:row.index(EOS)]
    return ByteTokenizer().decode(row)


def test_batch_from_file_equals_one_by_one_and_streaming(model_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out_file = tmp_path / "out.jsonl"
    batched = cli(model_dir, "--prompt-file", prompt_file, "--max-new-tokens", 12, "--batch-size", 3,
                  "--output", out_file)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    model = load_model(model_dir)
    expected = [reference(model, p, 12) for p in PROMPTS]
    assert [r["completion"] for r in rows] == expected
    assert [r["prompt"] for r in rows] == PROMPTS
    assert batched.stdout == "".join(f"[{i + 1}] {t}\n" for i, t in enumerate(expected))
    # batch size 1 streams token by token; the text that arrives is the same
    streamed = cli(model_dir, "--prompt-file", prompt_file, "--max-new-tokens", 12, "--batch-size", 1)
    assert streamed.stdout == batched.stdout


def test_streamer_delivers_pieces_as_they_come(model_dir):
    model = load_model(model_dir)
    tok = ByteTokenizer()
    pieces: list[str] = []
    [text] = generate_texts(model, tok, ["Hello"], SamplingOptions(max_new_tokens=10), 1,
                            on_text=pieces.append)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # not one chunk at the end


def test_stops_at_eos(tmp_path):
    # make EOS the greedy choice at the 4th step: its output row copies (and beats) the row
    # of the token the model would pick there
    model = tiny_model(seed=1)
    prompt = torch.tensor([ByteTokenizer().encode("Hi")])
    free = model.generate(prompt, 8)[0, 2:].tolist()
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[free[3]] * 1.5
    row = model.generate(prompt, 8)[0, 2:].tolist()
    assert EOS in row[:7], row
    folder = tmp_path / "eos_model"
    model.save_pretrained(folder)
    stopped = cli(folder, "--prompt", "Hi", "--max-new-tokens", 8).stdout
    assert stopped == ByteTokenizer().decode(row[:row.index(EOS)]) + "\n"
    ignored = cli(folder, "--prompt", "Hi", "--max-new-tokens", 8, "--ignore-eos", "--no-stream").stdout
    assert ignored == ByteTokenizer().decode(row) + "\n" and ignored != stopped


def test_template_is_data_prepare_qa_format(model_dir):
    assert apply_template("qa", "Is 3 odd?") == "Question: Is 3 odd?\nAnswer: "
    out = cli(model_dir, "--prompt", "Is 3 odd?", "--template", "qa", "--max-new-tokens", 6, "--no-stream")
    assert out.stdout == reference(load_model(model_dir), "Question: Is 3 odd?\nAnswer: ", 6) + "\n"


def test_sampling_is_seeded(model_dir):
    args = ("--prompt", "abc", "--max-new-tokens", 10, "--temperature", 1.0, "--top-k", 20, "--top-p", 0.9)
    first, again = cli(model_dir, *args, "--seed", 3), cli(model_dir, *args, "--seed", 3)
    assert first.stdout == again.stdout


@pytest.mark.parametrize("args,message", [
    (["MISSING"], "model folder"),
    (["NOFIELD", "--prompt", "x"], "is a file, not a model folder: convert a Composer checkpoint"),
    (["MODEL", "--prompt-file", "BADJSONL"], "prompts.jsonl:2: invalid JSON"),
    (["MODEL", "--prompt-file", "NOFIELD"], "nofield.jsonl:1: missing field"),
    (["MODEL"], "no prompts"),
    (["MODEL", "--prompt", "x", "--top-p", "0"], "top_p"),
])
def test_user_errors_are_one_line_and_exit_2(model_dir, tmp_path, args, message):
    (tmp_path / "prompts.jsonl").write_text('{"input": "ok"}\n{"input": "broken"\n')
    (tmp_path / "nofield.jsonl").write_text('{"question": "ok"}\n')
    names = {"MISSING": tmp_path / "nope", "MODEL": model_dir, "BADJSONL": tmp_path / "prompts.jsonl",
             "NOFIELD": tmp_path / "nofield.jsonl"}
    result = cli(*[names.get(a, a) for a in args], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
