"""A full training step (forward, loss, backward, AdamW) of a mamba2-130m-shaped model on CPU,
fp32: model FLOP/s against this machine's measured fp32 matmul peak, beside HF transformers'
Mamba2ForCausalLM (its CPU path) on the same weights.

Run: .venv/bin/python bench/bench_train_step.py [--layers 24] [--seq-len 2048] [--batch 1]
HF's CPU path does not fit 24 layers x 2048 tokens in 24 GB; compare with it at
     .venv/bin/python bench/bench_train_step.py --layers 4 --seq-len 1024 --hf-chunk 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_peak_gflops  # noqa: E402

from kernels.ssd import CPU_CHUNK_SIZE  # noqa: E402
from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba.model.flops import training_flops  # noqa: E402


def step_time(forward, params, ids, repeats: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up allocators and builds the C kernel
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-chunk", type=int, default=256,
                    help="HF's chunk size (its CPU path materialises [L, chunk, heads, d_state] per layer)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    print(machine())
    config = MambaConfig(d_model=768, n_layer=args.layers, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                         pad_vocab_size_multiple=16)
    ours = MambaLMHeadModel(config)
    ids = torch.randint(0, 50277, (args.batch, args.seq_len))
    # SSD counted at the chunk size the CPU path runs (64), not the config's 256: fewer FLOPs,
    # so the ratio below is the conservative one
    flops = training_flops(config, args.batch, args.seq_len, chunk_size=CPU_CHUNK_SIZE)
    peak = matmul_peak_gflops()
    print(f"mamba2-130m shape: {args.layers} layers, d_model 768, batch {args.batch} x {args.seq_len} "
          f"tokens, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"{flops / 1e9:.0f} GFLOP per step")
    print(f"measured fp32 matmul peak (2048^3 sgemm): {peak:.1f} GFLOP/s")
    t_ours = step_time(ours, list(ours.parameters()), ids, args.repeats)
    print(f"ours: {t_ours:.2f} s/step, {args.batch * args.seq_len / t_ours:.0f} tokens/s, "
          f"{flops / t_ours / 1e9:.1f} GFLOP/s = {flops / t_ours / 1e9 / peak:.0%} of peak")
    if args.no_hf:
        return
    import transformers

    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=768, num_heads=24, head_dim=64, n_groups=1, state_size=128, expand=2,
        chunk_size=args.hf_chunk, num_hidden_layers=args.layers, vocab_size=config.padded_vocab_size,
        tie_word_embeddings=True))
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v
             for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    t_hf = step_time(lambda x: hf(x).logits, list(hf.parameters()), ids, max(1, args.repeats - 1))
    print(f"HF transformers Mamba2ForCausalLM: {t_hf:.2f} s/step, "
          f"{args.batch * args.seq_len / t_hf:.0f} tokens/s, {flops / t_hf / 1e9:.1f} GFLOP/s = "
          f"{flops / t_hf / 1e9 / peak:.0%} of peak; ours is {t_hf / t_ours:.1f}x faster")


if __name__ == "__main__":
    main()
