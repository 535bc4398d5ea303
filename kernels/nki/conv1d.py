"""Depthwise causal conv1d (width <= 4, bias, optional SiLU, seq_idx) as NKI kernels.

Layout: channels on partitions (tiles of up to 128), time along the free axis (tiles of
`tile_len` tokens). y[c, t] = act(bias[c] + sum_k w[c, k] x[c, t - s_k] same_s(t)), s_k = w-1-k,
where same_s(t) = [seq(t) == seq(t - s)] keeps the window inside one document; positions with
seq(t) < 0 are padding and output 0 (causal_conv1d's convention).

Each time tile reads a halo: the forward needs w-1 inputs to the left of the tile; the backward
needs w-1 outputs to the *right*, because dx[t] = sum_k w_k g[t + s_k] same(t + s_k) with
g = dy * act'(pre) takes gradients from later tokens. The halo crosses the tile edge, so dx is
right on the last w-1 tokens of every tile (the public Trainium kernel drops these terms). The
backward recomputes the pre-activation of the tile and its right halo from x (no saved
activations). dweight / dbias come out per batch row ([b, d, w], [b, d, 1], fp32); the
caller sums them, so SPMD programs (one per row) never write the same HBM.

The per-token masks are [1, T] rows; a matmul by a ones row broadcasts them to the partitions.
"""

from __future__ import annotations

import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl
from neuronxcc import nki


def _window(src, bi, c0, rows, t0, T, left, right, at_start, at_end):
    """fp32 tile [rows, left+T+right] of src[bi, c0:c0+rows, t0-left : t0+T+right]; zeros past
    the row's ends (at_start / at_end: this tile is the row's first / last)."""
    tile = nl.zeros((rows, left + T + right), dtype=nl.float32)
    lo = left if at_start else 0
    hi = left + T if at_end else left + T + right
    tile[:, lo:hi] = nl.load(src[bi, c0:c0 + rows, t0 - left + lo:t0 - left + hi], dtype=nl.float32)
    return tile


def _same_doc_rows(seq, bi, t0, T, right, at_start, at_end, width, rows, docs):
    """Over the positions u = t0 .. t0+T+right-1, [rows, T+right] PSUM tiles: for each shift
    s = 1..w-1, [seq(u) == seq(u - s)]; and [seq(u) >= 0] (negative ids mark padding, whose
    output is 0). All None without documents (docs=False)."""
    if not docs:
        return [None] * (width - 1), None
    n = T + right
    seq_win = _window(seq, bi, 0, 1, t0, T, width - 1, right, at_start, at_end)
    ones_row = nl.ones((1, rows), dtype=nl.float32)
    masks = []
    for s in nl.static_range(1, width):
        row = nl.equal(seq_win[:, width - 1:width - 1 + n], seq_win[:, width - 1 - s:width - 1 - s + n],
                       dtype=nl.float32)
        masks.append(nisa.nc_matmul(ones_row, row))
    valid = nl.greater_equal(seq_win[:, width - 1:width - 1 + n], 0.0, dtype=nl.float32)
    return masks, nisa.nc_matmul(ones_row, valid)


def _masked(t, mask):
    return t if mask is None else nl.multiply(t, mask)


def _pre_activation(xw, wt, bt, masks, width, n):
    """bias + sum_k w_k x[u - s_k] same_{s_k}(u) for the n positions starting at window column w-1:
    one fused multiply-add per tap (plus one multiply per tap for the document mask)."""
    acc = nisa.tensor_scalar(xw[:, width - 1:width - 1 + n], nl.multiply, wt[:, width - 1:width],
                             op1=nl.add, operand1=bt)
    for k in nl.static_range(width - 1):
        shifted = _masked(xw[:, k:k + n], masks[width - 2 - k])  # masks[s-1], s = w-1-k
        acc = nisa.scalar_tensor_tensor(data=shifted, op0=nl.multiply, operand0=wt[:, k:k + 1],
                                        op1=nl.add, operand1=acc)
    return acc


def _fwd_tile(x, seq, y, wt, bt, bi, c0, rows, t0, T, width, at_start, silu, docs):
    xw = _window(x, bi, c0, rows, t0, T, width - 1, 0, at_start, True)
    masks, valid = _same_doc_rows(seq, bi, t0, T, 0, at_start, True, width, rows, docs)
    pre = _masked(_pre_activation(xw, wt, bt, masks, width, T), valid)
    out = nisa.activation(nl.silu if silu else nl.copy, pre, dtype=y.dtype)
    nl.store(y[bi, c0:c0 + rows, t0:t0 + T], value=out)


def _fwd_channels(x, weight, bias, seq, y, bi, c0, rows, T, silu, docs):
    width, length = weight.shape[1], x.shape[2]
    wt = nl.load(weight[c0:c0 + rows, 0:width], dtype=nl.float32)
    bt = nl.load(bias[c0:c0 + rows, 0:1], dtype=nl.float32)
    _fwd_tile(x, seq, y, wt, bt, bi, c0, rows, 0, T, width, True, silu, docs)
    for ti in nl.affine_range(1, length // T):
        _fwd_tile(x, seq, y, wt, bt, bi, c0, rows, ti * T, T, width, False, silu, docs)


@nki.jit
def causal_conv1d_fwd(x, weight, bias, seq, silu=True, tile_len=128, docs=True):
    """x [b, d, l]; weight [d, w] fp32; bias [d, 1] fp32; seq [b, 1, l] fp32 document ids (read
    only with docs=True). Launch on a grid of b programs. Returns y [b, d, l] in x's dtype."""
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    bi = nl.program_id(0)
    dim = x.shape[1]
    for ci in nl.affine_range(dim // nl.tile_size.pmax):
        _fwd_channels(x, weight, bias, seq, y, bi, ci * nl.tile_size.pmax, nl.tile_size.pmax, tile_len, silu,
                      docs)
    if dim % nl.tile_size.pmax:
        c0 = dim - dim % nl.tile_size.pmax
        _fwd_channels(x, weight, bias, seq, y, bi, c0, dim % nl.tile_size.pmax, tile_len, silu, docs)
    return y


def _bwd_tile(x, seq, dy, dx, wt, bt, dw_acc, db_acc, bi, c0, rows, t0, T, width, at_start, at_end, silu,
              docs):
    n = T + width - 1  # the tile and its right halo
    xw = _window(x, bi, c0, rows, t0, T, width - 1, width - 1, at_start, at_end)
    dyw = _window(dy, bi, c0, rows, t0, T, 0, width - 1, at_start, at_end)
    masks, valid = _same_doc_rows(seq, bi, t0, T, width - 1, at_start, at_end, width, rows, docs)
    if silu:
        pre = _masked(_pre_activation(xw, wt, bt, masks, width, n), valid)
        sig = nisa.activation(nl.sigmoid, pre)
        slope = nl.add(sig, nl.multiply(nl.multiply(pre, sig), nl.subtract(1.0, sig)))
        g = nl.multiply(dyw, slope)  # dL/dpre on the tile and its right halo (zero past the row end)
    else:
        g = dyw
    g = _masked(g, valid)  # padding outputs are constant 0
    dxt = nisa.tensor_scalar(g[:, 0:T], nl.multiply, wt[:, width - 1:width])
    dw_acc[:, width - 1:width] = nl.add(dw_acc[:, width - 1:width],
                                        nl.sum(nl.multiply(g[:, 0:T], xw[:, width - 1:width - 1 + T]),
                                               axis=1, keepdims=True))
    for k in nl.static_range(width - 1):
        s = width - 1 - k
        gm = _masked(g, masks[s - 1])  # g(u) same_s(u): the output u = t + s sees input t
        dxt = nisa.scalar_tensor_tensor(data=gm[:, s:s + T], op0=nl.multiply, operand0=wt[:, k:k + 1],
                                        op1=nl.add, operand1=dxt)
        dw_acc[:, k:k + 1] = nl.add(dw_acc[:, k:k + 1],
                                    nl.sum(nl.multiply(gm[:, 0:T], xw[:, k:k + T]), axis=1, keepdims=True))
    db_acc[...] = nl.add(db_acc, nl.sum(g[:, 0:T], axis=1, keepdims=True))
    nl.store(dx[bi, c0:c0 + rows, t0:t0 + T], value=nl.copy(dxt, dtype=dx.dtype))


def _bwd_channels(x, weight, bias, seq, dy, dx, dw, db, bi, c0, rows, T, silu, docs):
    width, length = weight.shape[1], x.shape[2]
    ntiles = length // T
    wt = nl.load(weight[c0:c0 + rows, 0:width], dtype=nl.float32)
    bt = nl.load(bias[c0:c0 + rows, 0:1], dtype=nl.float32)
    dw_acc = nl.zeros((rows, width), dtype=nl.float32)
    db_acc = nl.zeros((rows, 1), dtype=nl.float32)
    args = (x, seq, dy, dx, wt, bt, dw_acc, db_acc, bi, c0, rows)
    _bwd_tile(*args, 0, T, width, True, ntiles == 1, silu, docs)
    for ti in nl.sequential_range(1, ntiles - 1):
        _bwd_tile(*args, ti * T, T, width, False, False, silu, docs)
    if ntiles > 1:
        _bwd_tile(*args, (ntiles - 1) * T, T, width, False, True, silu, docs)
    nl.store(dw[bi, c0:c0 + rows, 0:width], value=dw_acc)
    nl.store(db[bi, c0:c0 + rows, 0:1], value=db_acc)


@nki.jit
def causal_conv1d_bwd(x, weight, bias, seq, dy, silu=True, tile_len=128, docs=True):
    """Gradients of causal_conv1d_fwd. Launch on a grid of b programs. Returns dx [b, d, l] (x's
    dtype), dweight [b, d, w] and dbias [b, d, 1] per batch row (fp32; sum them over b)."""
    batch, dim, _ = x.shape
    width = weight.shape[1]
    dx = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    dw = nl.ndarray((batch, dim, width), dtype=nl.float32, buffer=nl.shared_hbm)
    db = nl.ndarray((batch, dim, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    bi = nl.program_id(0)
    for ci in nl.affine_range(dim // nl.tile_size.pmax):
        _bwd_channels(x, weight, bias, seq, dy, dx, dw, db, bi, ci * nl.tile_size.pmax, nl.tile_size.pmax,
                      tile_len, silu, docs)
    if dim % nl.tile_size.pmax:
        c0 = dim - dim % nl.tile_size.pmax
        _bwd_channels(x, weight, bias, seq, dy, dx, dw, db, bi, c0, dim % nl.tile_size.pmax, tile_len, silu,
                      docs)
    return dx, dw, db
