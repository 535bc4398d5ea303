"""mamba/interop/neuron.py: neuron/train.py checkpoints (NxD's layout) read without NxD or torch-xla;
`python -m mamba.convert --from neuron` gives the trained model's logits; mamba/ never imports neuron/.

The checkpoints here are written by hand in NxD's layout from tp_plan's shards (the real layout,
written by NxD itself, is covered by tests/test_neuron_*.py)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.tp_plan import shard_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=61, d_model=32, n_layer=2, layer_pattern="M*", pad_vocab_size_multiple=8,
              ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16},
              attn_cfg={"num_heads": 2})


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_mamba_never_imports_neuron():
    """The house's boundary (shared/DESIGN.md): neuron/ imports mamba/, never the other way round."""
    files = sorted((ROOT / "mamba").rglob("*.py"))
    assert len(files) > 10
    upward = [f"{f.relative_to(ROOT)}: {name}" for f in files for name in _imported_modules(f)
              if name == "neuron" or name.startswith("neuron.")]
    assert upward == []


def test_reader_imports_neither_nxd_nor_xla():
    code = ("import sys, mamba.convert, mamba.interop.neuron; "
            "bad = [m for m in sys.modules "
            "if m.split('.')[0] in ('neuron', 'neuronx_distributed', 'torch_xla')]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _write_nxd_checkpoint(folder: Path, state: dict, config: MambaConfig, tp: int, step: int = 3) -> Path:
    """NxD's layout: step_N/model/dp_rank_00_tp_rank_XX_pp_rank_00.pt, user_content.pt, done."""
    tag = folder / f"step_{step}"
    (tag / "model").mkdir(parents=True)
    for rank in range(tp):
        shard = shard_state_dict(state, config, tp, rank)
        torch.save(shard, tag / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt")
    torch.save({"step": step, "data": {}, "model_config": config.to_dict(), "tp": tp, "zero1": False},
               tag / "user_content.pt")
    (tag / "done").touch()
    return tag


def _logits(model: MambaLMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[..., :model.config.vocab_size]


@pytest.mark.parametrize("tp", [1, 2])
def test_convert_from_neuron_gives_the_models_logits(tmp_path, tp):
    from mamba.convert import main

    config = MambaConfig(**CONFIG)
    torch.manual_seed(1)
    model = MambaLMHeadModel(config)
    _write_nxd_checkpoint(tmp_path / "ck", model.state_dict(), config, tp)
    assert main(["--from", "neuron", str(tmp_path / "ck"), "--to", "native", str(tmp_path / "out")]) == 0
    converted = MambaLMHeadModel.from_pretrained(tmp_path / "out")
    assert converted.config.tie_embeddings
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_a_tied_model_whose_head_trained_apart_keeps_its_trained_head(tmp_path):
    """Checkpoints written before neuron/ re-tied the head on XLA hold a head that trained apart from
    the embedding: the trained model's logits come from that head, so it is kept (untied)."""
    from mamba.convert import main

    config = MambaConfig(**CONFIG)
    torch.manual_seed(2)
    model = MambaLMHeadModel(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 0.05 * torch.randn_like(state["lm_head.weight"])
    _write_nxd_checkpoint(tmp_path / "ck", state, config, tp=2)
    untied = MambaLMHeadModel(MambaConfig(**dict(CONFIG, tie_embeddings=False)))
    untied.load_state_dict(state)  # the trained model: embedding in, its own head out
    assert main(["--from", "neuron", str(tmp_path / "ck" / "step_3"), "--to", "native",
                 str(tmp_path / "out")]) == 0
    converted = MambaLMHeadModel.from_pretrained(tmp_path / "out")
    assert not converted.config.tie_embeddings
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(converted, ids), _logits(untied, ids), rtol=0, atol=1e-6)


def test_a_folder_that_is_no_neuron_checkpoint_is_one_clear_error(tmp_path, capsys):
    from mamba.convert import main

    assert main(["--from", "neuron", str(tmp_path), "--to", "native", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a neuron checkpoint" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
