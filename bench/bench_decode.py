"""Decode speed and memory: our recurrent generate() vs transformers' Mamba(2)ForCausalLM.generate().

    python bench/bench_decode.py                      # speed at batch 1 and 16, then memory
    python bench/bench_decode.py --skip-memory --new-tokens 64
    python bench/bench_decode.py --layer mamba1 --skip-memory   # mamba-130m vs MambaForCausalLM

A mamba2-130m-shaped model (d_model 768, 24 layers, vocab 50280, ngroups 1, headdim 64,
d_state 128) with random weights; HF gets the same weights (names differ only in
backbone.embeddings). Greedy, no EOS, a 16-token prompt; tokens/s counts generated tokens
over the whole generate() call (prefill included). transformers' CPU path builds
[chunk x chunk] tensors per chunk, so its chunk_size is set to the prompt length (16):
with mamba2-130m's 256 its prefill alone takes minutes at batch 16 and ~20 GB.
Memory: each length runs in a fresh process; the number is the growth of peak RSS during
generate() after a short warm-up (so thread pools and kernel builds are not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402

VOCAB = 50280
PROMPT_LEN = 16


def build_ours(layers: int, kind: str = "mamba2") -> MambaLMHeadModel:
    torch.manual_seed(0)
    ssm = ({"layer": "Mamba2", "ngroups": 1, "headdim": 64, "d_state": 128} if kind == "mamba2"
           else {"layer": "Mamba1", "d_state": 16})
    config = MambaConfig(d_model=768, n_layer=layers, vocab_size=VOCAB, ssm_cfg=ssm)
    return MambaLMHeadModel(config).eval()


def build_hf(ours: MambaLMHeadModel, chunk_size: int):
    import transformers

    cfg = ours.config
    if cfg.ssm_cfg.get("layer") == "Mamba1":  # mamba-130m shape: MambaForCausalLM
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=768, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
            state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
            tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=0))
        state = {k.replace("backbone.embedding.", "backbone.embeddings."): v
                 for k, v in ours.state_dict().items()}
        hf.load_state_dict(state, strict=True)
        return hf.eval()
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=768, num_heads=24, head_dim=64, n_groups=1, state_size=128, expand=2,
        chunk_size=chunk_size, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
        tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=0, bos_token_id=0))
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v
             for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def speed(args) -> None:
    ours = build_ours(args.layers, args.layer)
    hf = None if args.no_hf else build_hf(ours, args.hf_chunk)
    print(f"machine: {machine()}")
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"{args.layer}-130m shape, {args.layers} layers, {params:.1f}M params, fp32, greedy, "
          f"prompt {PROMPT_LEN} tokens")
    for batch in args.batches:
        n = args.new_tokens
        ids = torch.randint(0, VOCAB, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
        ours.generate(ids, 4)  # warm-up
        t_ours, out_ours = timed(lambda: ours.generate(ids, n))
        line = f"batch {batch:2d}, {n} new tokens: ours {batch * n / t_ours:7.1f} tok/s ({t_ours:.2f} s)"
        if hf is not None:
            with torch.inference_mode():
                def run_hf(steps):
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                       min_new_tokens=steps, do_sample=False, use_cache=True)
                run_hf(4)
                t_hf, out_hf = timed(lambda: run_hf(n))
            same = torch.equal(out_ours, out_hf)
            line += (f" | transformers {batch * n / t_hf:7.1f} tok/s ({t_hf:.2f} s) | "
                     f"ours {t_hf / t_ours:.1f}x faster | same tokens: {'yes' if same else 'NO'}")
        print(line, flush=True)


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Linux: restart VmHWM from the current RSS (ru_maxrss would survive exec from the parent)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(args) -> None:
    """One length in this process: print JSON {new_tokens, rss_before_mb, rss_peak_mb}."""
    ours = build_ours(args.layers, args.layer)
    ids = torch.randint(0, VOCAB, (args.batch_for_memory, PROMPT_LEN),
                        generator=torch.Generator().manual_seed(0))
    ours.generate(ids, 8)  # warm-up: allocator pools, thread pools
    reset_peak_rss()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    ours.generate(ids, args.memory_child)
    seconds = time.perf_counter() - start
    print(json.dumps({"new_tokens": args.memory_child, "rss_before_mb": before,
                      "rss_peak_mb": status_mb("VmHWM"), "seconds": seconds}))


def memory(args) -> None:
    print(f"peak memory of ours.generate() at batch {args.batch_for_memory}, each length in a fresh process:")
    for n in args.memory_lengths:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--layers", str(args.layers),
               "--layer", args.layer,
               "--batch-for-memory", str(args.batch_for_memory)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {n:5d} new tokens: peak RSS {r['rss_peak_mb']:7.1f} MB, growth during generate "
              f"{r['rss_peak_mb'] - r['rss_before_mb']:6.1f} MB  ({n / r['seconds']:.1f} tok/s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--layer", choices=("mamba2", "mamba1"), default="mamba2",
                   help="mamba2-130m shape (vs Mamba2ForCausalLM) or mamba-130m (vs MambaForCausalLM)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-chunk", type=int, default=PROMPT_LEN, help="transformers' Mamba2 chunk_size")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch-for-memory", type=int, default=1)
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    if args.memory_child is not None:
        memory_child(args)
        return
    speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
