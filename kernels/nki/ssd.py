"""Mamba-2 SSD (chunked state space scan) as NKI kernels, forward and backward, with seq_idx.

One SPMD program per (batch row, group): B/C of a group are shared by its `rep` heads, so C.B^T,
the transposes of B and C and the document masks are built once per chunk for all of them.
A chunk is Q = 128 tokens, laid on the 128 partitions; per chunk and head (t, s positions):
  cum_t  = sum_{k<=t} dA_k (a matmul by an upper-triangular ones matrix)
  L[s,t] = exp(cum_t - cum_s) [s <= t] [no document start in (s, t]]
  y_t    = sum_s (C_t.B_s) L[s,t] dt_s x_s            (intra-chunk, a [Q,Q] x [Q,p] matmul)
         + exp(cum_t) [no start in chunk[0..t]] C_t.P  (the state P entering the chunk)
         + D x_t
  P'     = exp(cum_Q) [no start in chunk] P + sum_s B_s exp(cum_Q - cum_s) [s in the last doc] dt_s x_s
Document starts come from seq_idx as boundary counts (a cumulative sum by the same triangular
matmul), so a packed row never leaks state or intra-chunk terms across documents; positions are
compared by count equality, exact in fp32.

Backward: the forward writes the state entering each chunk ([b, h, chunks, n, p] fp32, 1/128 of
the full per-token state) and the backward reads it, instead of recomputing the sequential chunk
recurrence. That costs n*p*4 bytes of HBM writes per chunk and head in the forward (32 KB for
n=128, p=64: twice the chunk's bf16 x; skipped when no gradient is needed) and spares the
backward a second sequential sweep over the sequence: it walks the chunks in reverse with only
the reverse recurrence (dP = a dP' + C^T dZ) carried on chip;
everything inside a chunk (L, C.B^T, masks) is recomputed from x, dt, B, C, which is cheap next
to the matmuls that use it. All matmul operands are fp32 (inputs may be bf16; they are widened
on load), accumulation in fp32 PSUM. dB/dC sum over the heads of the group on chip; dD comes
out per batch row ([b, h, p, 1]) for the caller to sum. On chip the group carries its heads'
states, [n, heads_per_group * p] fp32 (and their gradients in the backward): up to 16,384
heads_per_group * p.
"""

from __future__ import annotations

import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl
from neuronxcc import nki

Q = 128
NEG = -1.0e30  # log-decay of masked pairs: exp gives exactly 0


def _constants():
    i_p, i_f = nl.arange(Q)[:, None], nl.arange(Q)[None, :]
    ones = nl.ones((Q, Q), dtype=nl.float32)
    upper = nisa.affine_select(i_f >= i_p, ones, 0.0)  # upper[s, t] = [s <= t]
    lower = nisa.affine_select(i_p >= i_f, ones, 0.0)  # lower[t, k] = [k <= t]
    return ones, upper, lower


def _rows(col, ones_row):
    """[Q, 1] column -> [Q, Q] with the column's values along every row (out[s, t] = col[t]):
    a PE transpose to a [1, Q] row, then a rank-1 matmul by ones to reach every partition."""
    return nisa.nc_matmul(ones_row, nl.copy(nisa.nc_transpose(col)))


def _chunk_group(B, C, seqp, bi, gi, t0, ones, upper, ones_row):
    """What a chunk's heads share: B, C and their transposes, C.B^T and the document masks."""
    n = B.shape[3]
    Bc = nl.load(B[bi, t0:t0 + Q, gi, 0:n], dtype=nl.float32)  # [Q(s), n]
    Cc = nl.load(C[bi, t0:t0 + Q, gi, 0:n], dtype=nl.float32)
    BT = nl.copy(nisa.nc_transpose(Bc))  # [n, Q]
    CT = nl.copy(nisa.nc_transpose(Cc))
    CBT = nl.copy(nisa.nc_matmul(BT, CT))  # CBT[s, t] = B_s . C_t
    # seqp holds seq_idx shifted right by one (seqp[t0 + t] is the id of token t - 1)
    start = nl.not_equal(nl.load(seqp[bi, t0 + 1:t0 + 1 + Q, 0:1]), nl.load(seqp[bi, t0:t0 + Q, 0:1]),
                         dtype=nl.float32)  # a document starts at t
    # A Vector Engine instruction reads at most one of its two input tiles from PSUM (NKI ISA,
    # nki.isa.tensor_tensor: "data1 and data2 cannot both reside in PSUM"), and starts_to meets the
    # PSUM tiles starts_row and total below: it lives in SBUF.
    starts_to = nl.copy(nisa.nc_matmul(upper, start))  # [Q(t), 1]: starts in chunk[0..t]
    starts_row = _rows(starts_to, ones_row)  # [s, t] -> starts_to[t] (PSUM)
    same = nl.equal(starts_row, starts_to, dtype=nl.float32)  # same[s, t]: no start in (s, t] (s <= t)
    total = nisa.nc_matmul(ones, start)  # [Q, 1]: starts in the chunk, on every partition (PSUM)
    sees_state = nl.equal(starts_to, 0.0, dtype=nl.float32)  # t belongs to the carried document
    in_last = nl.equal(starts_to, total, dtype=nl.float32)  # s belongs to the chunk's last document
    keep = nl.equal(total, 0.0, dtype=nl.float32)  # the carried state survives the chunk
    return Bc, Cc, BT, CT, CBT, (same, sees_state, in_last, keep)


def _chunk_head(dA, bi, hd, t0, ones, upper, ones_row, CBT, masks):
    """Per head: L (masked decays), M = C.B^T * L and the decays into / out of the chunk."""
    same, sees_state, in_last, keep = masks
    dAc = nl.load(dA[bi, t0:t0 + Q, hd:hd + 1])  # [Q, 1]
    cum = nl.copy(nisa.nc_matmul(upper, dAc))  # cum_t
    cum_row = _rows(cum, ones_row)  # [s, t] -> cum_t
    seg = nisa.tensor_scalar(cum_row, nl.subtract, cum)  # cum_t - cum_s
    i_p, i_f = nl.arange(Q)[:, None], nl.arange(Q)[None, :]
    L = nl.multiply(nl.exp(nisa.affine_select(i_f >= i_p, seg, NEG)), same)
    M = nl.multiply(L, CBT)  # M[s, t]: weight of token s in output t
    cum_last = nl.copy(nisa.nc_matmul(ones, dAc))  # cum_{Q-1} on every partition
    E = nl.multiply(nl.exp(cum), sees_state)  # decay from the chunk start to t
    W = nl.multiply(nl.exp(nl.subtract(cum_last, cum)), in_last)  # decay from s to the chunk end
    a = nl.multiply(nl.exp(cum_last), keep)  # decay of the carried state over the chunk
    return L, M, E, W, a


def _load_head(x, dt, D, bi, hd, t0, ones_row):
    p = x.shape[3]
    xc = nl.load(x[bi, t0:t0 + Q, hd, 0:p], dtype=nl.float32)  # [Q, p]
    dtc = nl.load(dt[bi, t0:t0 + Q, hd:hd + 1])
    Db = nisa.nc_matmul(ones_row, nl.load(D[hd:hd + 1, 0:p]))  # D on every partition: [Q, p]
    return xc, dtc, Db


@nki.jit
def ssd_fwd(x, dt, dA, B, C, D, seqp, save_states=True):
    """x [b, l, h, p]; dt, dA = dt*A [b, l, h] fp32; B, C [b, l, g, n]; D [h, p] fp32;
    seqp [b, l+1, 1] fp32 document ids shifted right by one (seqp[:, 0] = seq_idx[:, 0]).
    Grid (b, g). Returns y [b, l, h, p] (x's dtype) and, with save_states (for the backward),
    the states entering each chunk [b, h, l/128, n, p] fp32."""
    batch, length, nheads, p = x.shape
    ngroups, n = B.shape[2], B.shape[3]
    rep, nchunks = nheads // ngroups, length // Q
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    if save_states:
        states = nl.ndarray((batch, nheads, nchunks, n, p), dtype=nl.float32, buffer=nl.shared_hbm)
    bi, gi = nl.program_id(0), nl.program_id(1)
    ones, upper, _ = _constants()
    ones_row = nl.ones((1, Q), dtype=nl.float32)
    state = nl.zeros((n, rep * p), dtype=nl.float32)  # the carried state of every head of the group
    for c in nl.sequential_range(nchunks):
        t0 = c * Q
        Bc, Cc, BT, CT, CBT, masks = _chunk_group(B, C, seqp, bi, gi, t0, ones, upper, ones_row)
        for r in nl.affine_range(rep):
            hd = gi * rep + r
            L, M, E, W, a = _chunk_head(dA, bi, hd, t0, ones, upper, ones_row, CBT, masks)
            xc, dtc, Db = _load_head(x, dt, D, bi, hd, t0, ones_row)
            xdt = nisa.tensor_scalar(xc, nl.multiply, dtc)
            P = state[:, r * p:(r + 1) * p]
            if save_states:
                nl.store(states[bi, hd, c, 0:n, 0:p], value=P)
            out = nl.add(nisa.nc_matmul(M, xdt), nisa.tensor_scalar(nisa.nc_matmul(CT, P), nl.multiply, E))
            out = nl.add(out, nl.multiply(xc, Db), dtype=y.dtype)
            nl.store(y[bi, t0:t0 + Q, hd, 0:p], value=out)
            new = nisa.nc_matmul(Bc, nisa.tensor_scalar(xdt, nl.multiply, W))  # [n, p]
            state[:, r * p:(r + 1) * p] = nl.add(nisa.tensor_scalar(P, nl.multiply, a[0:n, :]), new)
    return (y, states) if save_states else y


def _tr(t):
    """A PE transpose (<= 128 x 128), back in SBUF for the next matmul."""
    return nl.copy(nisa.nc_transpose(t))


@nki.jit
def ssd_bwd(x, dt, dA, B, C, D, seqp, states, dy):
    """Gradients of ssd_fwd given dy [b, l, h, p]. Grid (b, g). Returns dx [b, l, h, p] (x's dtype),
    ddt, ddA [b, l, h], dB, dC [b, l, g, n] and dD [b, h, p, 1] per batch row (all fp32)."""
    batch, length, nheads, p = x.shape
    ngroups, n = B.shape[2], B.shape[3]
    rep, nchunks = nheads // ngroups, length // Q
    dx = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    ddt = nl.ndarray(dt.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    ddA = nl.ndarray(dA.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    dB = nl.ndarray(B.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    dC = nl.ndarray(C.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    dD = nl.ndarray((batch, nheads, p, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    bi, gi = nl.program_id(0), nl.program_id(1)
    ones, upper, lower = _constants()
    ones_row = nl.ones((1, Q), dtype=nl.float32)
    ones_col = nl.ones((Q, 1), dtype=nl.float32)
    dstate = nl.zeros((n, rep * p), dtype=nl.float32)  # dLoss/d(state leaving the chunk), per head
    dD_acc = nl.zeros((p, rep), dtype=nl.float32)  # column r: sum over tokens of dy * x for head r
    for c in nl.sequential_range(nchunks):
        cr = nchunks - 1 - c
        t0 = cr * Q
        Bc, Cc, BT, CT, CBT, masks = _chunk_group(B, C, seqp, bi, gi, t0, ones, upper, ones_row)
        dCBT = nl.zeros((Q, Q), dtype=nl.float32)
        dB_acc = nl.zeros((Q, n), dtype=nl.float32)
        dC_acc = nl.zeros((Q, n), dtype=nl.float32)
        for r in nl.sequential_range(rep):  # accumulates dCBT, dB, dC over the group's heads
            hd = gi * rep + r
            L, M, E, W, a = _chunk_head(dA, bi, hd, t0, ones, upper, ones_row, CBT, masks)
            xc, dtc, Db = _load_head(x, dt, D, bi, hd, t0, ones_row)
            xdt = nisa.tensor_scalar(xc, nl.multiply, dtc)
            dyc = nl.load(dy[bi, t0:t0 + Q, hd, 0:p], dtype=nl.float32)
            P = nl.load(states[bi, hd, cr, 0:n, 0:p])
            dP_out = dstate[:, r * p:(r + 1) * p]
            dD_acc[:, r:r + 1] = nl.add(dD_acc[:, r:r + 1], nisa.nc_matmul(nl.multiply(dyc, xc), ones_col))
            # y = M^T xdt: dxdt = M dy, dM = xdt dy^T
            dxdt = nl.copy(nisa.nc_matmul(_tr(M), dyc))
            dM = nisa.nc_matmul(_tr(xdt), _tr(dyc))  # [s, t]
            dCBT[...] = nl.add(dCBT, nl.multiply(dM, L))
            dseg = nl.multiply(nl.multiply(dM, CBT), L)  # through exp(cum_t - cum_s)
            dcum = nl.subtract(nisa.nc_matmul(dseg, ones_col), nl.sum(dseg, axis=1, keepdims=True))
            # y += E (C P): dE, dC, dP
            Z = nisa.nc_matmul(CT, P)
            dcum = nl.add(dcum, nl.multiply(nl.sum(nl.multiply(dyc, Z), axis=1, keepdims=True), E))
            dZ = nisa.tensor_scalar(dyc, nl.multiply, E)
            dC_acc[...] = nl.add(dC_acc, nisa.nc_matmul(_tr(dZ), _tr(P)))
            dP = nisa.nc_matmul(Cc, dZ)  # [n, p]
            # P_out = a P + B^T (W xdt): dB, dW, dxdt, da
            dxw = nisa.nc_matmul(BT, dP_out)  # [Q(s), p]
            dxdt = nl.add(dxdt, nisa.tensor_scalar(dxw, nl.multiply, W))
            dB_acc[...] = nl.add(dB_acc, nisa.nc_matmul(_tr(nisa.tensor_scalar(xdt, nl.multiply, W)),
                                                        _tr(dP_out)))
            dW_W = nl.multiply(nl.sum(nl.multiply(dxw, xdt), axis=1, keepdims=True), W)
            dcum = nl.subtract(dcum, dW_W)
            da_a = nl.multiply(nl.sum(nl.multiply(dP_out, P), axis=1, keepdims=True), a[0:n, :])
            # cum_last = sum of every dA in the chunk: its gradient reaches every position
            # (two matmul results: one goes to SBUF first, as an add reads at most one PSUM input)
            d_last = nl.add(nl.copy(nisa.nc_matmul(ones, dW_W)), nisa.nc_matmul(ones[0:n, :], da_a))
            ddAc = nl.add(nisa.nc_matmul(lower, dcum), d_last)  # reverse cumulative sum over the chunk
            nl.store(ddA[bi, t0:t0 + Q, hd:hd + 1], value=ddAc)
            ddtc = nl.sum(nl.multiply(dxdt, xc), axis=1, keepdims=True)
            nl.store(ddt[bi, t0:t0 + Q, hd:hd + 1], value=ddtc)
            dxc = nl.add(nisa.tensor_scalar(dxdt, nl.multiply, dtc), nl.multiply(dyc, Db), dtype=dx.dtype)
            nl.store(dx[bi, t0:t0 + Q, hd, 0:p], value=dxc)
            dstate[:, r * p:(r + 1) * p] = nl.add(nisa.tensor_scalar(dP_out, nl.multiply, a[0:n, :]), dP)
        # C.B^T, shared by the heads: dC[t] += sum_s dCBT[s, t] B_s, dB[s] += sum_t dCBT[s, t] C_t
        dC_acc[...] = nl.add(dC_acc, nisa.nc_matmul(dCBT, Bc))
        dB_acc[...] = nl.add(dB_acc, nisa.nc_matmul(_tr(dCBT), Cc))
        nl.store(dB[bi, t0:t0 + Q, gi, 0:n], value=dB_acc)
        nl.store(dC[bi, t0:t0 + Q, gi, 0:n], value=dC_acc)
    for r in nl.affine_range(rep):
        nl.store(dD[bi, gi * rep + r, 0:p, 0:1], value=dD_acc[:, r:r + 1])
    return dx, ddt, ddA, dB, dC, dD
