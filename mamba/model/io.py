"""Save / load a state-spaces style folder: config.json + model.safetensors or pytorch_model.bin."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from mamba.model.config import MambaConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch pickle (weights_only: no arbitrary code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: one line naming it
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped tensors (first few of each)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        cfg = model.config
        raise ValueError(f"{source} does not match the config (d_model={cfg.d_model}, "
                         f"n_layer={cfg.n_layer}, layers={''.join(cfg.layer_kinds())}, "
                         f"vocab={cfg.padded_vocab_size}): " + "; ".join(parts))


def load_pretrained(cls, path, device=None, dtype=None):
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a folder with config.json and "
                                f"one of {', '.join(WEIGHT_FILES)}")
    try:
        config = MambaConfig.from_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: invalid JSON ({exc})") from None
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has config.json but no {' or '.join(WEIGHT_FILES)}")
    state = read_state_dict(weights)
    model = cls(config)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def save_pretrained(model, path, safe_serialization: bool = True) -> None:
    """Write config.json and weights atomically (a temporary folder renamed into place)."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, tmp_path / "pytorch_model.bin")
        folder.mkdir(exist_ok=True)
        for name in ("config.json", *WEIGHT_FILES):
            if (tmp_path / name).exists():
                os.replace(tmp_path / name, folder / name)
            elif name in WEIGHT_FILES and (folder / name).exists():
                (folder / name).unlink()  # a stale weight file of the other format would win
