"""Work per 128-token chunk of the NKI kernels, counted by the NumPy executor, beside the same
counts for the textbook formulation. Counts, not timings: no Trainium here.

    python -m kernels.nki.work [--heads 24 --headdim 64 --groups 1 --dstate 128 --channels 1792]

SSD rows are per chunk and per head; conv rows per 128 tokens and 128 channels. "matmul" is
Tensor Engine FLOPs (2*K*M*N per nc_matmul; fp32 operands, which the PE array runs at 1/4 of
its bf16 rate), "transposes" elements moved through the PE array by nc_transpose, "elementwise"
elements produced by the vector / scalar / gpsimd engines, "HBM" bytes moved by nl.load/store.

The textbook SSD is the Mamba-2 paper's minimal chunked listing run by eager torch (fp32): C.B^T
per head, every intermediate ([Q,Q] decays, scores, per-chunk states, both output parts) written
to HBM once and read back once, B and C repeated per head. The textbook conv backward is the
same as ours in arithmetic; what it differs in is correctness at tile edges, not work.
"""

from __future__ import annotations

import argparse

import numpy as np

Q = 128
F32 = 4


def _run(kernel, grid, *args):
    from kernels.nki import executor

    executor.counters.reset()
    out = kernel[grid](*args)
    return executor.counters.as_dict(), out


def ssd_work(nheads=8, headdim=64, ngroups=1, dstate=128, nchunks=2, dtype_bytes=2) -> dict:
    """Counters of ssd_fwd / ssd_bwd on random inputs, per chunk and head."""
    from kernels.nki import executor

    executor.install()
    from kernels.nki import ssd

    rng = np.random.default_rng(0)
    length = nchunks * Q
    bf16 = executor.core.bfloat16 if dtype_bytes == 2 else None

    def hbm(*shape, scale=1.0, half=True):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        return executor.hbm_tensor(a, bf16 if half else None)

    x = hbm(1, length, nheads, headdim)
    B, C = hbm(1, length, ngroups, dstate), hbm(1, length, ngroups, dstate)
    dt = executor.hbm_tensor(rng.uniform(0.001, 0.05, (1, length, nheads)).astype(np.float32))
    dA = executor.hbm_tensor(-np.abs(np.asarray(dt.data)))
    D = hbm(nheads, headdim, half=False)
    seqp = executor.hbm_tensor(np.zeros((1, length + 1, 1), np.float32))
    per = nchunks * nheads
    fwd, (_, states) = _run(ssd.ssd_fwd, (1, ngroups), x, dt, dA, B, C, D, seqp)
    dy = hbm(1, length, nheads, headdim)
    bwd, _ = _run(ssd.ssd_bwd, (1, ngroups), x, dt, dA, B, C, D, seqp, executor.hbm_tensor(states), dy)
    return {k: {name: v / per for name, v in c.items()} for k, c in (("fwd", fwd), ("bwd", bwd))}


def ssd_textbook(headdim=64, dstate=128, dtype_bytes=2) -> dict:
    """The textbook forward per chunk and head (see the module docstring), counted by hand."""
    p, n = headdim, dstate
    matmul = 2 * Q * Q * n + 2 * Q * Q * p + 2 * Q * n * p + 2 * Q * n * p  # C.B^T, (L*CB) X, states, C.P
    elementwise = 3 * Q * Q + Q * Q + Q * p + Q + 2 * n * p + 2 * Q * p  # segsum+exp+mask, L*CB, X*dt, ...
    inputs = Q * p * dtype_bytes + 2 * Q * n * dtype_bytes + Q * F32  # x, B and C per head, dt
    intermediates = 2 * F32 * (3 * Q * Q + 2 * n * p + 2 * Q * p)  # L, CB, scores, states x2, Y parts
    return {"matmul_flops": matmul, "transpose_elems": 0, "vector_elems": elementwise,
            "dma_bytes": inputs + intermediates + Q * p * dtype_bytes}


def conv_work(channels=1792, width=4, ntiles=3) -> dict:
    """Counters of causal_conv1d_fwd / _bwd (silu, seq_idx), per 128 tokens and 128 channels."""
    from kernels.nki import executor

    executor.install()
    from kernels.nki import conv1d

    rng = np.random.default_rng(0)
    length = ntiles * Q
    x = executor.hbm_tensor(rng.standard_normal((1, channels, length)).astype(np.float32),
                            executor.core.bfloat16)
    w = rng.standard_normal((channels, width)).astype(np.float32)
    b = rng.standard_normal((channels, 1)).astype(np.float32)
    seq = np.zeros((1, 1, length), np.float32)
    per = ntiles * channels / Q
    fwd, _ = _run(conv1d.causal_conv1d_fwd, 1, x, w, b, seq)
    dy = executor.hbm_tensor(rng.standard_normal((1, channels, length)).astype(np.float32),
                             executor.core.bfloat16)
    bwd, _ = _run(conv1d.causal_conv1d_bwd, 1, x, w, b, seq, dy)
    return {k: {name: v / per for name, v in c.items()} for k, c in (("fwd", fwd), ("bwd", bwd))}


def _row(name, counts):
    def cell(key, scale, unit):
        return "-" if counts.get(key) is None else f"{counts[key] / scale:.{2 if unit == 'M' else 1}f} {unit}"

    return (f"| {name} | {cell('matmul_flops', 1e6, 'M')} | {cell('transpose_elems', 1e3, 'K')} | "
            f"{cell('vector_elems', 1e3, 'K')} | {cell('dma_bytes', 1e3, 'KB')} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--channels", type=int, default=1792)
    args = parser.parse_args(argv)
    ssd = ssd_work(args.heads, args.headdim, args.groups, args.dstate)
    conv = conv_work(args.channels)
    print(f"SSD, per 128-token chunk and head (h={args.heads}, p={args.headdim}, g={args.groups}, "
          f"n={args.dstate}, bf16 x/B/C); conv per 128 tokens x 128 channels (w=4, silu, bf16 x)")
    print("| kernel | matmul FLOPs | PE transposes | element-wise | HBM bytes |")
    print("|---|---|---|---|---|")
    print(_row("SSD forward, ours", ssd["fwd"]))
    print(_row("SSD forward, textbook", ssd_textbook(args.headdim, args.dstate)))
    print(_row("SSD backward, ours", ssd["bwd"]))
    textbook_bwd = {"matmul_flops": 2 * ssd_textbook(args.headdim, args.dstate)["matmul_flops"]}
    print(_row("SSD backward, textbook (autograd: two matmuls per forward matmul)", textbook_bwd))
    print(_row("conv forward, ours", conv["fwd"]))
    print(_row("conv backward, ours", conv["bwd"]))


if __name__ == "__main__":
    main()
