"""Model FLOPs per token, Mamba-aware: matmuls plus the scan, conv and attention terms."""

from __future__ import annotations

from mamba.model.config import ATTENTION, MAMBA1, MAMBA2, MLP, MambaConfig


def forward_flops_per_token(config: MambaConfig, seq_len: int, chunk_size: int | None = None) -> float:
    """Forward FLOPs for one token of a row of seq_len tokens (a multiply-add counts 2).

    Mamba-2's SSD is counted as the chunked algorithm runs it: per token 2*h*p*n for the
    chunk states, 2*h*p*n for the state read-out, and 2*Q*(h*p + g*n) for the intra-chunk
    quadratic part with Q = chunk_size (the config's, unless `chunk_size` says which the kernel
    actually runs, e.g. 64 on CPU). Mamba-1's scan: ~9*d_inner*d_state (decay exp,
    state update and read-out). Attention: 2*seq_len*h*d for causal QK^T and AV together.
    """
    d = config.d_model
    total = 2.0 * d * config.padded_vocab_size  # LM head
    with_mlp = config.layer_pattern is None and config.d_intermediate > 0
    for kind in config.layer_kinds():
        if kind == MAMBA2:
            o = config.ssm_options(MAMBA2)
            di, n, g, p = o["expand"] * d, o["d_state"], o["ngroups"], o["headdim"]
            q = chunk_size or o["chunk_size"]
            conv_dim = di + 2 * g * n
            total += 2 * d * (2 * di + 2 * g * n + di // p) + 2 * di * d  # in_proj, out_proj
            total += 2 * conv_dim * o["d_conv"]
            total += 4 * di * n + 2 * q * (di + g * n)
        elif kind == MAMBA1:
            o = config.ssm_options(MAMBA1)
            di, n = o["expand"] * d, o["d_state"]
            rank = -(-d // 16) if o["dt_rank"] == "auto" else o["dt_rank"]
            total += 2 * d * 2 * di + 2 * di * (rank + 2 * n) + 2 * rank * di + 2 * di * d
            total += 2 * di * o["d_conv"] + 9 * di * n
        elif kind == ATTENTION:
            o = config.attn_options()
            h, kv, hd = o["num_heads"], o["num_heads_kv"], o["head_dim"]
            total += 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d + 2 * seq_len * h * hd
        elif kind == MLP:
            total += _mlp_flops(config)
        if with_mlp and kind != MLP:
            total += _mlp_flops(config)
    return total


def _mlp_flops(config: MambaConfig) -> float:
    d, hidden = config.d_model, config.d_intermediate
    if config.mlp_activation == "swiglu":
        hidden = -(-hidden // 128) * 128
        return 2 * d * 2 * hidden + 2 * hidden * d
    return 4 * d * hidden


def training_flops(config: MambaConfig, batch: int, seq_len: int, chunk_size: int | None = None) -> float:
    """Forward + backward (2x forward) FLOPs for a [batch, seq_len] batch."""
    return 3.0 * batch * seq_len * forward_flops_per_token(config, seq_len, chunk_size)
