"""Checkpoint conversion at 1.3B shape: wall time and peak RSS per conversion.

    python bench/bench_convert.py [--workdir DIR] [--keep]

Builds random-weight sources at mamba2-1.3b shape (d_model 2048, 48 Mamba-2 layers, vocab
50277 padded to 50288, fp32: 5.4 GB) without ever holding a model object, then times each
conversion in a fresh process, which reports its own peak RSS (file pages it memory-maps count).
Needs about 6x the weight size of free disk in --workdir.
"""

from __future__ import annotations

import argparse
import argparse as _argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from mamba.interop.tensors import expected_shapes, write_safetensors  # noqa: E402
from mamba.model import MambaConfig  # noqa: E402

CONFIG = dict(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16,
              ssm_cfg={"layer": "Mamba2"})


def random_tensors(config: MambaConfig):
    generator = torch.Generator().manual_seed(0)
    for name, shape in expected_shapes(config).items():
        yield name, torch.randn(shape, generator=generator) * 0.02


def make_sources(work: Path) -> dict[str, Path]:
    config = MambaConfig(**CONFIG)
    native = work / "src-native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps(config.to_dict()))
    write_safetensors(native / "model.safetensors", random_tensors(config), expected_shapes(config))
    # a Megatron TP=1 release checkpoint of the same weights (pure Mamba-2: every layer 'M')
    from safetensors import safe_open

    rank = work / "src-megatron" / "release" / "mp_rank_00"
    rank.mkdir(parents=True)
    state = {}
    with safe_open(str(native / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            key = (key.replace("backbone.embedding.", "embedding.word_embeddings.")
                   .replace("backbone.norm_f.", "decoder.final_norm.").replace("backbone.", "decoder."))
            state[key] = t
    args = _argparse.Namespace(mamba_num_groups=1, mamba_state_dim=128, normalization="RMSNorm")
    torch.save({"model": state, "args": args, "iteration": 0}, rank / "model_optim_rng.pt")
    del state
    return {"native": native, "megatron": work / "src-megatron"}


def child(argv: list[str]) -> None:
    from mamba.convert import convert

    from_format, src, to_format, dst = argv
    start = time.perf_counter()
    convert(from_format, src, to_format, dst)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def run(from_format: str, src: Path, to_format: str, dst: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", from_format, str(src), to_format,
                          str(dst)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{from_format} -> {to_format} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        sources = make_sources(work)
        weight_gb = (sources["native"] / "model.safetensors").stat().st_size / 1e9
        print(f"machine: {machine()}")
        print(f"model: mamba2-1.3b shape, fp32, {weight_gb:.2f} GB of weights")
        cases = [("native", sources["native"], "hf", work / "hf"),
                 ("hf", work / "hf", "native", work / "native2"),
                 ("native", sources["native"], "state-spaces", work / "ss"),
                 ("state-spaces", work / "ss", "native", work / "native3"),
                 ("megatron", sources["megatron"], "native", work / "native4")]
        print("| conversion | time (s) | peak RSS (GB) | peak RSS / weight size |")
        print("|---|---|---|---|")
        for from_format, src, to_format, dst in cases:
            result = run(from_format, src, to_format, dst)
            peak_gb = result["peak_rss_mb"] * 2**20 / 1e9
            print(f"| {from_format} -> {to_format} | {result['seconds']:.1f} | {peak_gb:.2f} | "
                  f"{peak_gb / weight_gb:.2f} |", flush=True)
            if dst not in [c[1] for c in cases]:  # keep what a later case reads
                shutil.rmtree(dst)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
