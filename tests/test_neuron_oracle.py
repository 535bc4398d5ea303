"""neuron/'s trainer on torch-xla's CPU device against the recipe's own arithmetic in plain torch.

A tied model (tie_embeddings: true, vocabulary 61 padded to 64) trains three steps on XLA with
neuron/trainer.py; the same weights and batches go through a plain torch AdamW loop whose loss is
the Composer recipe's (MambaLMHeadModel(..., labels=...), mamba/model/loss.py). The losses match
(and a float64 cross entropy over the 61 real classes), the weights after the steps match, the head
stays the embedding, and `python -m mamba.convert --from neuron` of the XLA run's checkpoint gives
the trained model's logits.

Also the worker: `python tests/test_neuron_oracle.py OUT` (PJRT_DEVICE=CPU, a fresh process).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402

CONFIG = dict(vocab_size=61, d_model=32, n_layer=2, layer_pattern="M*", pad_vocab_size_multiple=8,
              tie_embeddings=True, ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 32},
              attn_cfg={"num_heads": 2})
FLAGS = ["--lr", "0.01", "--warmup-steps", "1", "--max-steps", "3", "--grad-clip", "0.5"]


def steps(n: int = 3) -> list[list[dict]]:
    """n optimizer steps of two microbatches; labels partly -100, two packed documents per row."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        mbs = []
        for _ in range(2):
            labels = torch.randint(0, 61, (2, 64), generator=g)
            labels[torch.rand(2, 64, generator=g) < 0.2] = -100
            seq_idx = torch.cat([torch.zeros(2, 20, dtype=torch.int32),
                                 torch.ones(2, 44, dtype=torch.int32)], 1)
            mbs.append({"input_ids": torch.randint(0, 61, (2, 64), generator=g), "labels": labels,
                        "seq_idx": seq_idx})
        out.append(mbs)
    return out


def settings():
    from neuron.config import parse_settings

    # eps 1e-3: Adam's division by sqrt(v) + eps keeps rounding in near-zero gradients small
    return dataclasses.replace(parse_settings(FLAGS), model=MambaConfig(**CONFIG), eps=1e-3)


def worker(out: str) -> None:
    from neuron import checkpoint
    from neuron.parallel import full_state_dict
    from neuron.runtime import init_distributed
    from neuron.trainer import build_model, build_optimizer, step_loss, train_step

    world = init_distributed(1)
    assert world.mode == "xla_cpu", world.mode
    s = settings()
    model = build_model(s, world)
    initial = full_state_dict(model, 1)
    optimizer = build_optimizer(model, s, world)
    losses = [step_loss(train_step(model, optimizer, mbs, i, s, world), world)
              for i, mbs in enumerate(steps())]
    content = {"step": 3, "data": {}, "model_config": s.model.to_dict(), "tp": 1, "zero1": False}
    checkpoint.save(str(Path(out).parent / "ck"), 3, model, optimizer, content, keep_last=1)
    probe = steps(1)[0][0]
    with torch.no_grad():
        logits = model(probe["input_ids"].to(world.device), seq_idx=probe["seq_idx"].to(world.device)).cpu()
    torch.save({"tied": model.lm_head.weight is model.backbone.embedding.weight, "initial": initial,
                "final": full_state_dict(model, 1), "losses": losses, "logits": logits}, out)


def reference(initial: dict, s) -> tuple[list[float], MambaLMHeadModel]:
    """Plain torch, CPU: the recipe's loss weighted by labelled tokens, AdamW with the no-decay groups,
    clipping, neuron's schedule."""
    from neuron.trainer import lr_at, param_groups

    model = MambaLMHeadModel(s.model)
    model.load_state_dict(initial)
    assert model.lm_head.weight is model.backbone.embedding.weight
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps)
    losses = []
    for step, mbs in enumerate(steps()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        n = sum(int((mb["labels"] != -100).sum()) for mb in mbs)
        total = 0.0
        for mb in mbs:
            out = model(mb["input_ids"], seq_idx=mb["seq_idx"], labels=mb["labels"])
            (out.loss * out.n_tokens / n).backward()
            total += float(out.loss_sum) / n
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad()
    return losses, model


def float64_loss(initial: dict, mbs: list[dict]) -> float:
    """Cross entropy over the 61 real classes, in float64, by hand (log-sum-exp minus the target)."""
    model = MambaLMHeadModel(MambaConfig(**CONFIG)).double()
    model.load_state_dict({k: v.double() for k, v in initial.items()})
    total, n = 0.0, 0
    with torch.no_grad():
        for mb in mbs:
            logits = model(mb["input_ids"], seq_idx=mb["seq_idx"])[..., :61].reshape(-1, 61)
            labels = mb["labels"].reshape(-1)
            keep = labels != -100
            rows, targets = logits[keep], labels[keep]
            total += float((torch.logsumexp(rows, -1) - rows[torch.arange(len(targets)), targets]).sum())
            n += int(keep.sum())
    return total / n


@pytest.mark.timeout(400)
def test_xla_training_equals_plain_torch_with_a_tied_head(tmp_path):
    from neuron.runtime import missing_packages

    if missing_packages():
        pytest.skip("needs torch-xla and neuronx-distributed: "
                    "pip install -r neuron/requirements-cpu-test.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PJRT_DEVICE="CPU")
    for key in ("NXD_CPU_MODE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "xla.pt"
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    xla = torch.load(out, weights_only=True)
    assert xla["tied"], "lm_head.weight is not backbone.embedding.weight after moving to the XLA device"

    s = settings()
    losses, trained = reference(xla["initial"], s)
    # the loss: the recipe's (real vocabulary only), and a float64 one by hand, for the same weights
    assert abs(xla["losses"][0] - losses[0]) < 1e-5, (xla["losses"], losses)
    assert abs(xla["losses"][0] - float64_loss(xla["initial"], steps()[0])) < 1e-5
    assert max(abs(a - b) for a, b in zip(xla["losses"], losses, strict=True)) < 1e-4, (xla["losses"], losses)
    # the weights after three steps
    final = trained.state_dict()
    moved = max((final[k] - v).abs().max().item() for k, v in xla["initial"].items())
    diff = max((xla["final"][k] - v).abs().max().item() for k, v in final.items())
    assert moved > 1e-2 and diff < 1e-4, (moved, diff)
    assert torch.equal(xla["final"]["lm_head.weight"], xla["final"]["backbone.embedding.weight"])

    # the checkpoint converts to a folder with the trained model's logits
    from mamba.convert import main as convert_main

    assert convert_main(["--from", "neuron", str(tmp_path / "ck"), "--to", "native",
                         str(tmp_path / "hf")]) == 0
    converted = MambaLMHeadModel.from_pretrained(tmp_path / "hf")
    probe = steps(1)[0][0]
    with torch.no_grad():
        logits = converted(probe["input_ids"], seq_idx=probe["seq_idx"])
        want = trained(probe["input_ids"], seq_idx=probe["seq_idx"])
    assert (logits - xla["logits"]).abs().max().item() < 1e-5
    assert (logits - want).abs().max().item() < 1e-4


if __name__ == "__main__":
    worker(sys.argv[1])
