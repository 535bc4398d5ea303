"""Kernels for Mamba-family models: one dispatch point per op.

Each public function picks an implementation by device and availability:
  * CUDA tensors -> mamba_ssm / causal_conv1d kernels for the calls they handle, else our Triton
    kernels (kernels/triton), else torch;
  * CPU tensors -> our torch paths (and compiled C for the Mamba-1 scan and for decoding);
  * XLA tensors with the Neuron compiler (neuronxcc) -> NKI kernels (kernels/nki) for the SSD scan,
    the causal conv and the gated norm;
  * anything else (CUDA without the extras, XLA without neuronxcc, MPS) -> the torch paths.
The torch paths are tested against the sequential float64 recurrences in kernels.reference.
"""

from kernels.dispatch import (
    add_rms_norm,
    backend_for,
    backends_for,
    causal_conv1d_fn,
    causal_conv1d_update,
    decoding_threads,
    linear,
    mamba1_block_step,
    mamba1_mixer_step,
    mamba2_block_step,
    mamba2_step,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
    selective_scan_fn,
    selective_state_update,
)
from kernels.norm import rms_norm

__all__ = [
    "add_rms_norm",
    "backend_for",
    "backends_for",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "decoding_threads",
    "linear",
    "mamba1_block_step",
    "mamba1_mixer_step",
    "mamba2_block_step",
    "mamba2_step",
    "mamba_chunk_scan_combined",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "rms_norm",
    "rms_norm_gated",
    "selective_scan_fn",
    "selective_state_update",
]
