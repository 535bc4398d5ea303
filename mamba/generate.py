"""Generate text from a saved model: ``python -m mamba.generate MODEL_DIR --prompt TEXT ...``.

Prompts come from ``--prompt`` (repeatable) or ``--prompt-file`` (one prompt per line, or
JSONL with an ``input`` / ``prompt`` / ``text`` field). ``--template qa`` wraps each prompt in
data.prepare's instruction template, so a model fine-tuned with ``--mode instruct`` sees
exactly the prompt format it was trained on. Prompts run in left-padded batches through
the recurrent cache (prefill once, then one token per step: constant memory per sequence
for Mamba layers). With one prompt per batch the tokens are streamed to stdout as they come.

A user mistake (no such model folder, bad JSONL line, bad flag value) prints one line
``error: ...`` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from data.errors import DataError
from data.sources import describe_json_error

PROMPT_KEYS = ("input", "prompt", "text")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(DataError):
    """A user-fixable problem with the command line or its inputs (printed as ``error: ...``)."""


# ---- inputs ---------------------------------------------------------------------------------
def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(FILE:LINE, object)`` for each non-blank line; a bad line raises naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: {describe_json_error(err)}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def pick_field(obj: dict[str, Any], keys: Sequence[str], where: str) -> str:
    """The first of ``keys`` present in ``obj``; it must be a string."""
    for key in keys:
        if key in obj:
            if not isinstance(obj[key], str):
                raise UsageError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
            return obj[key]
    raise UsageError(f"{where}: missing field: need one of {', '.join(map(repr, keys))}; "
                     f"fields: {', '.join(map(str, obj)) or 'none'}")


def read_prompts(path: str | Path) -> list[str]:
    """JSONL (``.jsonl``/``.json``): one object per line; any other file: one prompt per line."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return [pick_field(obj, PROMPT_KEYS, where) for where, obj in iter_jsonl(path)]
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def apply_template(template: str | None, text: str, context: str | None = None) -> str:
    """data.prepare's instruction prompt (the same functions, so the formats cannot drift);
    ``context`` is a passage shown before the question (SQuAD)."""
    from data.prepare import format_prompt, resolve_template

    return format_prompt(resolve_template(template) if template else "{input}", text, context)


# ---- model and tokenizer --------------------------------------------------------------------
def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    from mamba.model import MambaLMHeadModel

    folder = check_model_folder(path)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        model = MambaLMHeadModel.from_pretrained(folder, device=resolve_device(device), dtype=DTYPES[dtype])
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    return model.eval()


def check_model_folder(path: str | Path) -> Path:
    folder = Path(path)
    if folder.is_file():  # most likely a training checkpoint
        raise UsageError(f"{str(folder)!r} is a file, not a model folder: convert a Composer checkpoint "
                         "first (python -m mamba.convert --from composer CKPT --config MODEL_CONFIG.json "
                         "--to native DIR) or give the run's export_folder")
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise UsageError(f"model folder {str(folder)!r} {what}: give a save_pretrained / converted folder "
                         "(config.json + model.safetensors or pytorch_model.bin)")
    return folder


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available; use --device cpu")
    return device


def load_tokenizer_for(model_dir: str | Path, name: str | None, vocab_size: int,
                       eos_token: str | None = None):
    """``name`` if given; else the model folder's own tokenizer files (Hugging Face files, a
    tokenizer.json or a SentencePiece .model); else the byte tokenizer."""
    from data.tokenizer import load_tokenizer, tokenizer_files

    if name is None:
        folder = Path(model_dir)
        name = str(folder.absolute()) if tokenizer_files(folder) else "byte"
    tok = load_tokenizer(name, eos_token)
    if tok.vocab_size > vocab_size:
        raise UsageError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model only "
                         f"{vocab_size}: pass the model's tokenizer with --tokenizer")
    return tok


# ---- generation -----------------------------------------------------------------------------
@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    seed: int = 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [b, longest], prompts aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (generation itself stops only at EOS)."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def generate_texts(model, tok, prompts: Sequence[str], options: SamplingOptions, batch_size: int = 8,
                   on_text: Callable[[str], None] | None = None) -> list[str]:
    """Completions (decoded, EOS and later tokens removed) for each prompt, in order.

    ``on_text`` receives the completion's text piece by piece as tokens arrive; it needs
    ``batch_size == 1`` (rows of a batch finish at different times).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if on_text is not None and batch_size != 1:
        raise ValueError("streaming needs batch_size=1")
    if options.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {options.max_new_tokens}: must be >= 0")
    device = model.backbone.embedding.weight.device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    eos = tok.eos_token_id if options.stop_at_eos else None
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tok.encode(p) for p in prompts[start:start + batch_size]]
        if any(not e for e in encoded):
            raise UsageError(f"prompt {start + [len(e) for e in encoded].index(0) + 1} is empty")
        ids, mask = left_pad(encoded, tok.pad_token_id)
        streamer = _TextStreamer(tok, on_text, eos) if on_text is not None else None
        try:
            out = model.generate(ids.to(device), options.max_new_tokens, temperature=options.temperature,
                                 top_k=options.top_k, top_p=options.top_p, eos_token_id=eos,
                                 attention_mask=mask.to(device) if len(encoded) > 1 else None,
                                 generator=generator, streamer=streamer)
        except ValueError as err:  # bad sampling settings
            raise UsageError(str(err)) from None
        for row in out[:, ids.shape[1]:].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            completions.append(tok.decode(row))
        if streamer is not None and streamer.printed < len(completions[-1]):
            on_text(completions[-1][streamer.printed:])  # a held-back tail (an incomplete character)
    return completions


class _TextStreamer:
    """Turns the model's per-step tokens into text deltas (whole characters only)."""

    def __init__(self, tok, on_text: Callable[[str], None], eos: int | None) -> None:
        self.tok, self.on_text, self.eos = tok, on_text, eos
        self.ids: list[int] = []
        self.printed = 0
        self.done = False

    def __call__(self, token: torch.Tensor) -> None:
        if self.done:
            return
        value = int(token[0])
        if value == self.eos:
            self.done = True
            return
        self.ids.append(value)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.on_text(text[self.printed:])
        self.printed = len(text)


# ---- command line ---------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None,
                   help="save_pretrained / converted folder (config.json + weights)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a HF tokenizer name or folder, a SentencePiece .model, a tokenizer.json "
                        "(default: the model folder's tokenizer files if it has them, else 'byte')")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="the tokenizer's end token (or id), where it names none or another")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per left-padded batch")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut each completion at the first TEXT (repeatable; e.g. --stop $'\\n')")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop_at_eos=not args.ignore_eos, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="one prompt per line, or JSONL with an input / prompt / text field")
    p.add_argument("--template", default=None,
                   help="wrap prompts in data.prepare's instruct template: qa, alpaca, plain or a "
                        "string with {input}")
    add_sampling_arguments(p, max_new_tokens=64)
    p.add_argument("--output", metavar="FILE", help="also write JSONL {prompt, completion} here")
    p.add_argument("--no-stream", action="store_true",
                   help="print each completion when it is complete (streaming needs one prompt or "
                        "--batch-size 1)")
    return p


def run(args: argparse.Namespace, stdout: TextIO) -> None:
    check_model_folder(args.model)
    prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT or --prompt-file FILE")
    try:
        prompts = [apply_template(args.template, p) for p in prompts]
    except DataError as err:
        raise UsageError(f"--template: {err}") from None
    model = load_model(args.model, args.device, args.dtype)
    tok = load_tokenizer_for(args.model, args.tokenizer, model.config.vocab_size, args.eos_token)
    options = sampling_options(args)
    # one prompt at a time streams; rows of a batch finish at different times, so batches print whole
    stream = not args.no_stream and not args.stop and (args.batch_size == 1 or len(prompts) == 1)
    completions = []
    for i, prompt in enumerate(prompts):
        if not stream and i % args.batch_size:
            continue
        if stream:
            if len(prompts) > 1:
                stdout.write(f"[{i + 1}] ")
            texts = generate_texts(model, tok, [prompt], options, 1,
                                   on_text=lambda piece: (stdout.write(piece), stdout.flush()))
            stdout.write("\n")
        else:
            batch = prompts[i:i + args.batch_size]
            texts = generate_texts(model, tok, batch, options, args.batch_size)
            texts = [cut_at_stop(t, args.stop) for t in texts]
            for j, text in enumerate(texts):
                stdout.write(f"[{i + j + 1}] {text}\n" if len(prompts) > 1 else f"{text}\n")
        stdout.flush()
        completions.extend(texts)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for prompt, text in zip(prompts, completions, strict=True):
                f.write(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False) + "\n")


def run_cli(task) -> int:
    """Run task(); a user's mistake (DataError) is one `error:` line and exit code 2."""
    try:
        task()
    except DataError as err:  # UsageError, bad shards, a tokenizer that cannot load
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
