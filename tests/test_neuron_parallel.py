"""Real tensor parallelism under neuronx-distributed: 2 gloo ranks (NXD_CPU_MODE=1), NxD's own
parallel layers. tp=2 gives the logits, loss and gradients of the plain model from the same
weights, two training steps give the same weights, and the TP=2 checkpoint converts to a native
folder whose logits equal the plain model's after the same updates. Hybrid: Mamba-2 (ngroups 2),
Mamba-1, attention (GQA), MLP; packed documents.

This file is also the worker: `torchrun --nproc_per_node 2 tests/test_neuron_parallel.py OUT`.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402

CONFIG = dict(vocab_size=61, d_model=64, n_layer=5, layer_pattern="M*-mM", d_intermediate=96,
              pad_vocab_size_multiple=8,
              ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16},
              attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8})
# one B/C group (every state-spaces Mamba-2): B, C replicated, the gated norm summed across ranks
ONE_GROUP = dict(CONFIG, ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16, "bias": True})


def batches(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 61, (2, 32), generator=g)
        labels = torch.randint(0, 61, (2, 32), generator=g)
        labels[0, :7] = -100
        seq_idx = torch.tensor([[0] * 12 + [1] * 20, [0] * 5 + [1] * 9 + [2] * 18], dtype=torch.int32)
        out.append({"input_ids": ids, "labels": labels, "seq_idx": seq_idx})
    return out


def reference_steps(model, settings, steps):
    """Plain torch: masked mean CE over the real vocabulary (the padding rows are no classes), AdamW
    with the recipe's no-decay groups, clipping, same lr."""
    from neuron.trainer import lr_at, param_groups

    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas,
                            eps=settings.eps)
    for step, mbs in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        n = sum(int((mb["labels"] != -100).sum()) for mb in mbs)
        for mb in mbs:
            logits = model(mb["input_ids"], seq_idx=mb["seq_idx"])[..., :model.config.vocab_size]
            loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum") / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad()


def worker(out_path: str) -> None:
    from neuron.runtime import init_distributed

    world = init_distributed(2)
    assert world.world_size == 2 and world.tp == 2 and world.mode == "cpu"
    results = {name: check(MambaConfig(**values), world, Path(out_path).parent / name)
               for name, values in (("two_groups", CONFIG), ("one_group", ONE_GROUP))}
    if world.rank == 0:
        Path(out_path).write_text(json.dumps(results))
    torch.distributed.barrier()


def check(config: MambaConfig, world, folder: Path) -> dict:
    from neuron import checkpoint
    from neuron.config import parse_settings
    from neuron.parallel import full_state_dict, gather_logits, lm_loss, parallelize
    from neuron.trainer import train_step

    torch.manual_seed(0)
    full = MambaLMHeadModel(config)  # float32: NxD's ParallelEmbedding supports float32 / bfloat16 only
    for p in full.parameters():  # non-trivial norms and biases
        if p.dim() == 1:
            p.data.add_(0.05 * torch.randn_like(p))
    source = MambaLMHeadModel(config)  # not deepcopy: it drops the parameters' _no_weight_decay flags
    source.load_state_dict(full.state_dict())
    tp_model = parallelize(source, 2)
    results = {}

    mb = batches(1)[0]
    ref_logits = full(mb["input_ids"], seq_idx=mb["seq_idx"])
    n = (mb["labels"] != -100).sum()
    # the recipe's own loss (mamba/model/loss.py: real vocabulary rows only) as the reference
    ref_loss = full(mb["input_ids"], seq_idx=mb["seq_idx"], labels=mb["labels"]).loss
    ref_loss.backward()
    logits = tp_model(mb["input_ids"], seq_idx=mb["seq_idx"])
    loss = lm_loss(logits, mb["labels"], n, config.vocab_size)
    loss.backward()
    results["logits"] = (gather_logits(logits) - ref_logits).abs().max().item()
    results["logits_scale"] = ref_logits.abs().max().item()
    results["loss"] = abs(loss.item() - ref_loss.item())
    grads = {k: p.grad for k, p in tp_model.named_parameters()}
    for k in grads:  # full_state_dict merges whatever the parameters hold: swap grads in
        grads[k], tp_model.get_parameter(k).data = tp_model.get_parameter(k).data, grads[k]
    merged = full_state_dict(tp_model, 2)
    for k, data in grads.items():
        tp_model.get_parameter(k).data = data
    ref_grads = {k: p.grad for k, p in full.named_parameters()}
    results["grads"] = max((merged[k] - g).abs().max().item() for k, g in ref_grads.items())
    results["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
    results["grads_checked"] = len(ref_grads)
    full.zero_grad()
    tp_model.zero_grad()

    settings = dataclasses.replace(parse_settings(["--lr", "0.01", "--warmup-steps", "1", "--max-steps", "2",
                                                   "--grad-clip", "0.5"]), model=config, tp=2,
                                   eps=1e-3)  # Adam's eps: rounding in near-zero gradients stays small
    steps = [batches(2, seed=10 + i) for i in range(2)]
    from neuron.trainer import build_optimizer

    opt = build_optimizer(tp_model, settings, world)
    for step, mbs in enumerate(steps):
        train_step(tp_model, opt, mbs, step, settings, world)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    reference_steps(full, settings, steps)
    after = full_state_dict(tp_model, 2)
    ref_after = full.state_dict()
    results["weights_after_steps"] = max((after[k] - v).abs().max().item() for k, v in ref_after.items())
    results["weights_moved"] = min((v - before[k]).abs().max().item() for k, v in ref_after.items()
                                   if k.endswith("in_proj.weight"))

    ckpt = str(folder / "ckpt")
    content = {"step": 2, "data": {}, "model_config": config.to_dict(), "tp": 2}
    checkpoint.save(ckpt, 2, tp_model, opt, content, keep_last=1)
    if world.rank == 0:
        from mamba.interop.native import write_native

        native = folder / "native"  # what `mamba.convert --from neuron` does
        native.mkdir(parents=True)
        write_native(checkpoint.read_neuron(ckpt), native)
        converted = MambaLMHeadModel.from_pretrained(native)
        with torch.no_grad():
            a = converted(mb["input_ids"], seq_idx=mb["seq_idx"])
            b = full(mb["input_ids"], seq_idx=mb["seq_idx"])
        results["converted_logits"] = (a - b).abs().max().item()
        results["tp_files"] = sorted(os.listdir(os.path.join(ckpt, "step_2", "model")))
    return results


def _skip_without_nxd():
    from neuron.runtime import missing_packages

    missing = missing_packages()
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: pip install -r neuron/requirements-cpu-test.txt",
                    allow_module_level=True)


_skip_without_nxd()


@pytest.mark.timeout(300)
def test_tp2_under_nxd_equals_the_plain_model(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, NXD_CPU_MODE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PJRT_DEVICE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    proc = subprocess.run(torchrun + [__file__, str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for r in json.loads(out.read_text()).values():
        _check_result(r)


def _check_result(r: dict) -> None:
    assert r["logits"] < 2e-6, r
    assert r["loss"] < 2e-6, r
    assert r["grads_checked"] > 30 and r["grads"] < 2e-6 * max(1.0, r["grad_scale"]), r
    assert r["weights_moved"] > 1e-3, r  # the steps really changed the weights
    assert r["weights_after_steps"] < 2e-5, r
    assert r["converted_logits"] < 2e-5, r
    assert r["tp_files"] == ["dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]


@pytest.mark.timeout(300)
def test_tp2_training_run_resumes_bit_identically(tmp_path):
    """torchrun neuron/train.py --tp 2: the tiny default (Mamba-2 with one B/C group) on the bundled
    corpus (TP ranks read the same rows), plain AdamW; the state on disk after a kill following
    step 2 resumes to the same weights, also with activation checkpointing."""
    from data import TINY_CORPUS
    from data.prepare import prepare
    from neuron.checkpoint import read_neuron_checkpoint

    prepare([str(TINY_CORPUS)], str(tmp_path / "data"), 256, progress=False)
    env = dict(os.environ, NXD_CPU_MODE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PJRT_DEVICE", None)
    args = ["--tp", "2",
            "--data", str(tmp_path / "data"), "--max-steps", "3", "--micro-batch", "2", "--grad-accum", "2",
            "--log-every", "1", "--checkpoint-every", "1", "--metrics-file", "m.jsonl"]

    def train(folder, *extra):
        folder.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(ROOT / "neuron" / "train.py"), *args, "--checkpoint-dir", "ck", *extra]
        proc = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=140)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        console = proc.stdout + proc.stderr  # NxD's INFO lines and warnings go to ck/logs/
        assert "neuronx_distributed" not in console and "Warning" not in console, console
        return [json.loads(line) for line in (folder / "m.jsonl").read_text().splitlines()]

    first = train(tmp_path / "a")
    assert [m["step"] for m in first] == [1, 2, 3] and first[-1]["loss"] < first[0]["loss"]
    assert sorted(p.name for p in (tmp_path / "a" / "ck").glob("step_*")) == ["step_2", "step_3"]
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "ck", tmp_path / "b" / "ck")
    shutil.rmtree(tmp_path / "b" / "ck" / "step_3")
    # resumed with the YAML's activation checkpointing on: recomputing blocks changes no number
    resumed = train(tmp_path / "b", "--resume", "model.activation_checkpointing=true")
    assert [m["loss"] for m in resumed] == [first[-1]["loss"]]
    _, a = read_neuron_checkpoint(tmp_path / "a" / "ck")
    _, b = read_neuron_checkpoint(tmp_path / "b" / "ck")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    worker(sys.argv[1])
