"""Convert checkpoints between layouts:
``python -m mamba.convert --from FORMAT SRC --to FORMAT DST``.

Reads: native (our save_pretrained folder), state-spaces (config.json + pytorch_model.bin),
hf (transformers Mamba / Mamba2 folder), megatron (NVIDIA Megatron-LM / NeMo
model_optim_rng.pt, tensor-parallel ranks merged), split (a native/state-spaces folder whose
Mamba-2 in_proj is split into in_proj_z / in_proj_xBC / in_proj_dt, as Trainium trainings
save it; any folder reader also accepts it), composer (a Composer checkpoint, monolithic .pt or
sharded folder, with --config).
Writes: native, hf, state-spaces. Tensors stream one at a time; the output folder appears only
when complete.

Mamba-2's gated RMSNorm with n_groups > 1 comes in two forms: per group (state-spaces, NVIDIA,
transformers >= 5, transformers 4.x's CUDA training path: how such models are trained) and across
all channels (transformers < 5's torch path). Per group is the default for every source, whichever
transformers saved it; `--gated-norm across-channels` is the explicit other choice, and a source
that records its own (our folders) keeps it. A note says which form was used. `--to hf` warns when
the target transformers (`--transformers-version`, default: the installed one) would compute the
other form.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mamba.interop.hf import (
    GATED_NORMS,
    gated_norm_note,
    hf_config,
    mamba2_ngroups,
    read_hf,
    with_gated_norm,
    write_hf,
)
from mamba.interop.megatron import read_megatron
from mamba.interop.native import read_composer, read_folder, write_native, write_state_spaces
from mamba.interop.tensors import Checkpoint, ConvertError

READ_FORMATS = ("native", "state-spaces", "hf", "megatron", "split", "composer", "neuron")
WRITE_FORMATS = ("native", "hf", "state-spaces")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_checkpoint(fmt: str, src: str | Path, *, config: str | Path | None = None,
                    ngroups: int | None = None, num_heads: int | None = None,
                    num_kv_heads: int | None = None, mlp_activation: str | None = None,
                    unsafe_pickle: bool = False, gated_norm: str | None = None) -> Checkpoint:
    src = Path(src)
    if fmt not in READ_FORMATS:
        raise ConvertError(f"--from {fmt!r}: unknown format; use one of {', '.join(READ_FORMATS)}")
    if gated_norm is not None and gated_norm not in GATED_NORMS:
        raise ConvertError(f"--gated-norm {gated_norm!r}: use one of {', '.join(GATED_NORMS)}")
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    if fmt == "hf":
        if not src.is_dir():
            raise ConvertError(f"{src}: expected a Hugging Face folder")
        return read_hf(src, gated_norm)
    if fmt in ("native", "state-spaces", "split"):
        ckpt = read_folder(src)
    elif fmt == "megatron":
        ckpt = read_megatron(src, ngroups=ngroups, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             mlp_activation=mlp_activation, unsafe=unsafe_pickle)
    elif fmt == "neuron":
        from mamba.interop.neuron import read_neuron  # merges the TP shards; needs neither NxD nor XLA

        ckpt = read_neuron(src)
    else:
        ckpt = read_composer(src, Path(config) if config else None, unsafe=unsafe_pickle)
    if gated_norm is not None:
        if not mamba2_ngroups(ckpt.config):
            raise ConvertError(f"--gated-norm {gated_norm}: {src} has no Mamba-2 layers")
        ckpt.config = with_gated_norm(ckpt.config, gated_norm == GATED_NORMS[1])
        how = f"as --gated-norm {gated_norm} asks"
    elif "norm_across_channels" in ckpt.config.ssm_cfg:
        how = "as the source's config records"
    else:
        how = "the default for every source"
    ckpt.notes.extend(gated_norm_note(ckpt.config, str(src), how))
    return ckpt


def convert(from_format: str, src: str | Path, to_format: str, dst: str | Path, *,
            tokenizer: str | Path | None = None, config: str | Path | None = None,
            ngroups: int | None = None, num_heads: int | None = None,
            num_kv_heads: int | None = None, mlp_activation: str | None = None,
            dtype: str | None = None, unsafe_pickle: bool = False, overwrite: bool = False,
            gated_norm: str | None = None, transformers_version: str | None = None) -> list[str]:
    """Convert SRC (in from_format) to a folder DST (in to_format). Returns notes for the user
    (e.g. that a hybrid was written in state-spaces form because transformers has no class)."""
    dst = Path(dst)
    if to_format not in WRITE_FORMATS:
        raise ConvertError(f"--to {to_format!r}: unknown format; use one of {', '.join(WRITE_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; pass --overwrite to replace it")
    ckpt = read_checkpoint(from_format, src, config=config, ngroups=ngroups, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, mlp_activation=mlp_activation,
                           unsafe_pickle=unsafe_pickle, gated_norm=gated_norm)
    writer = {"native": write_native, "hf": functools.partial(write_hf, target_version=transformers_version),
              "state-spaces": write_state_spaces}[to_format]
    if to_format == "hf":
        try:
            hf_config(ckpt.config)
        except ConvertError as exc:
            ckpt.notes.append(f"note: no Hugging Face export: {exc}; wrote the state-spaces form "
                              f"instead (load it with MambaLMHeadModel.from_pretrained)")
            writer = write_state_spaces
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        writer(ckpt, out, DTYPES.get(dtype) if dtype else None)
        copy_tokenizer(Path(tokenizer) if tokenizer else ckpt.tokenizer_dir, out, required=bool(tokenizer))
        if dst.exists():
            old = Path(tmp) / "old"
            os.replace(dst, old)
        os.replace(out, dst)
    return ckpt.notes


def copy_tokenizer(source: Path | None, out: Path, required: bool = False) -> None:
    """Copy the tokenizer files at ``source`` (data.tokenizer decides which: Hugging Face files, a
    tokenizer.json, a SentencePiece .model under any name); ``required``: finding none is an error."""
    from data.errors import DataError
    from data.tokenizer import tokenizer_files

    if source is None:
        return
    try:
        files = tokenizer_files(source)
    except DataError:
        raise ConvertError(f"--tokenizer {source}: no such file or folder") from None
    if required and not files:
        raise ConvertError(f"--tokenizer {source}: the folder holds no tokenizer files (tokenizer.json, "
                           "tokenizer_config.json or a SentencePiece .model)")
    for file in files:
        shutil.copy2(file, out / file.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "SRC"), required=True,
                   help=f"input format ({', '.join(READ_FORMATS)}) and its file or folder")
    p.add_argument("--to", dest="target", nargs=2, metavar=("FORMAT", "DST"), required=True,
                   help=f"output format ({', '.join(WRITE_FORMATS)}) and the folder to create")
    p.add_argument("--tokenizer", help="tokenizer file or folder to copy into DST (default: the "
                                       "tokenizer files of a source folder, if any)")
    p.add_argument("--config", help="composer: config.json (or the folder holding it) of the run")
    p.add_argument("--ngroups", type=int, help="megatron: Mamba-2 B/C groups when args lack "
                                               "mamba_num_groups (1 for state-spaces 130m-2.7b, 8 for "
                                               "NVIDIA 8B)")
    p.add_argument("--num-heads", type=int, help="megatron: attention heads when args lack them")
    p.add_argument("--num-kv-heads", type=int, help="megatron: attention KV groups (GQA)")
    p.add_argument("--mlp-activation", choices=("gelu", "relu2"),
                   help="megatron: MLP activation (default from args: relu2 if squared_relu else gelu)")
    p.add_argument("--gated-norm", choices=GATED_NORMS,
                   help="Mamba-2 gated RMSNorm when n_groups > 1: per-group (state-spaces, NVIDIA, "
                        "transformers >= 5, transformers 4.x's CUDA training path) or across-channels "
                        "(transformers < 5's torch path). Default: per-group for every source, "
                        "unless the source records its own (our folders)")
    p.add_argument("--transformers-version", metavar="VERSION",
                   help="hf export: the transformers that will load DST, to warn if it would compute "
                        "the gated norm differently (default: the installed version)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating tensors (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="DANGEROUS: fully unpickle torch files, which can run arbitrary code "
                        "from the file. Only for checkpoints you trust whose pickles hold "
                        "objects beyond tensors, argparse.Namespace and numpy arrays")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    (from_format, src), (to_format, dst) = args.source, args.target
    try:
        notes = convert(from_format, src, to_format, dst, tokenizer=args.tokenizer,
                        config=args.config, ngroups=args.ngroups, num_heads=args.num_heads,
                        num_kv_heads=args.num_kv_heads, mlp_activation=args.mlp_activation,
                        dtype=args.dtype, unsafe_pickle=args.unsafe_pickle,
                        overwrite=args.overwrite, gated_norm=args.gated_norm,
                        transformers_version=args.transformers_version)
    except ConvertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    for note in notes:
        print(note, file=sys.stderr)
    print(f"wrote {to_format} checkpoint to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
