"""A first look without data or training: build a tiny hybrid model (Mamba-2, Mamba-1, attention,
MLP), run forward and backward on a packed batch, and generate with the recurrent cache.

    python -m mamba.demo
"""

from __future__ import annotations

import time

import torch

from kernels.selective_scan import c_kernel_available
from mamba.model import MambaConfig, MambaLMHeadModel


def main() -> None:
    torch.manual_seed(0)
    config = MambaConfig(d_model=128, n_layer=6, vocab_size=256, layer_pattern="Mm*-M-",
                         d_intermediate=256, ssm_cfg={"d_state": 32, "headdim": 32, "chunk_size": 64},
                         attn_cfg={"num_heads": 4, "rotary_emb_dim": 32})
    model = MambaLMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: layers {config.layer_pattern} (M Mamba-2, m Mamba-1, * attention, - MLP), "
          f"{params / 1e6:.2f}M parameters; Mamba-1 C kernel: {c_kernel_available()}")
    text = b"Mamba models carry a fixed-size state instead of a growing cache. " * 8
    ids = torch.tensor(list(text[:256]), dtype=torch.long).view(2, 128)
    seq_idx = torch.tensor([[0] * 50 + [1] * 78, [0] * 128])  # two documents packed in row 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(30):
        logits = model(ids, seq_idx=seq_idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    print(f"30 training steps in {time.perf_counter() - start:.1f} s")
    model.eval()
    prompt = torch.tensor([list(b"Mamba models")])
    out = model.generate(prompt, 40)
    print("sample:", bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
