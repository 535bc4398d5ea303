"""Mamba-2's grouped gated RMSNorm as NKI kernels, forward and backward.

    norm_before_gate=False: y = rmsnorm_g(x * silu(z)) * w      (Mamba-2's choice)
    norm_before_gate=True:  y = rmsnorm_g(x) * w * silu(z)
with rmsnorm_g normalising each group of `group_size` channels. Rows (tokens) lie on the
partitions, 128 per tile and one SPMD program per tile; channels along the free axis. The
backward recomputes the gate and the per-group 1/rms from x and z (nothing saved but the inputs)
and returns dweight per row tile ([tiles, d] fp32) for the caller to sum. Partition sums (for
dweight) and the broadcast of w to every partition are matmuls by ones, in pieces of 512 columns.
"""

from __future__ import annotations

import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl
from neuronxcc import nki

Q = 128
FMAX = 512  # free size of one matmul result (a PSUM bank of fp32)


def _weight_rows(weight, dim):
    """w [1, d] on every partition: [Q, d] fp32."""
    ones_row = nl.ones((1, Q), dtype=nl.float32)
    w_row = nl.load(weight[0:1, 0:dim], dtype=nl.float32)
    wb = nl.ndarray((Q, dim), dtype=nl.float32, buffer=nl.sbuf)
    for j in nl.static_range((dim + FMAX - 1) // FMAX):
        hi = min(dim, (j + 1) * FMAX)
        wb[:, j * FMAX:hi] = nisa.nc_matmul(ones_row, w_row[:, j * FMAX:hi])
    return wb


def _gate(zt):
    """silu(z) and its derivative sig(z) (1 + z (1 - sig(z)))."""
    sig = nisa.activation(nl.sigmoid, zt)
    slope = nl.add(sig, nl.multiply(nl.multiply(zt, sig), nl.subtract(1.0, sig)))
    return nl.multiply(zt, sig), slope


def _inv_rms(u, g0, gs, eps):
    """[Q, 1]: 1 / sqrt(mean(u^2) + eps) over the channels g0 .. g0+gs."""
    ug = u[:, g0:g0 + gs]
    ms = nl.sum(nl.multiply(ug, ug), axis=1, keepdims=True)
    return nl.rsqrt(nisa.tensor_scalar(ms, nl.multiply, 1.0 / gs, op1=nl.add, operand1=eps))


@nki.jit
def gated_rms_norm_fwd(x, z, weight, group_size, eps=1e-5, gated=True, norm_before_gate=False):
    """x, z [N, d] (N a multiple of 128; z ignored unless gated), weight [1, d] fp32.
    Grid (N / 128,). Returns y [N, d] in x's dtype."""
    dim = x.shape[1]
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    r0 = nl.program_id(0) * Q
    wb = _weight_rows(weight, dim)
    xt = nl.load(x[r0:r0 + Q, 0:dim], dtype=nl.float32)
    u = xt
    if gated:
        gate, _ = _gate(nl.load(z[r0:r0 + Q, 0:dim], dtype=nl.float32))
        if not norm_before_gate:
            u = nl.multiply(xt, gate)
    out = nl.ndarray((Q, dim), dtype=nl.float32, buffer=nl.sbuf)
    for gi in nl.static_range(dim // group_size):
        g0 = gi * group_size
        normed = nisa.tensor_scalar(u[:, g0:g0 + group_size], nl.multiply, _inv_rms(u, g0, group_size, eps))
        out[:, g0:g0 + group_size] = nl.multiply(normed, wb[:, g0:g0 + group_size])
    if gated and norm_before_gate:
        out = nl.multiply(out, gate)
    nl.store(y[r0:r0 + Q, 0:dim], value=nl.copy(out, dtype=y.dtype))
    return y


@nki.jit
def gated_rms_norm_bwd(x, z, weight, dy, group_size, eps=1e-5, gated=True, norm_before_gate=False):
    """Gradients of gated_rms_norm_fwd. Grid (N / 128,). Returns dx (x's dtype), dz (z's dtype)
    and dweight per row tile [N / 128, d] fp32."""
    dim = x.shape[1]
    dx = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    dz = nl.ndarray(z.shape, dtype=z.dtype, buffer=nl.shared_hbm)
    dw = nl.ndarray((x.shape[0] // Q, dim), dtype=nl.float32, buffer=nl.shared_hbm)
    tile = nl.program_id(0)
    r0 = tile * Q
    wb = _weight_rows(weight, dim)
    ones_col = nl.ones((Q, 1), dtype=nl.float32)
    xt = nl.load(x[r0:r0 + Q, 0:dim], dtype=nl.float32)
    dyt = nl.load(dy[r0:r0 + Q, 0:dim], dtype=nl.float32)
    u, dn = xt, nl.multiply(dyt, wb)  # dn = dLoss / d(normalised u)
    if gated:
        zt = nl.load(z[r0:r0 + Q, 0:dim], dtype=nl.float32)
        gate, slope = _gate(zt)
        if norm_before_gate:
            dn = nl.multiply(dn, gate)
        else:
            u = nl.multiply(xt, gate)
    normed = nl.ndarray((Q, dim), dtype=nl.float32, buffer=nl.sbuf)
    du = nl.ndarray((Q, dim), dtype=nl.float32, buffer=nl.sbuf)
    for gi in nl.static_range(dim // group_size):
        g0, g1 = gi * group_size, (gi + 1) * group_size
        inv = _inv_rms(u, g0, group_size, eps)
        n_g = nisa.tensor_scalar(u[:, g0:g1], nl.multiply, inv)
        normed[:, g0:g1] = n_g
        # d(u r)/du: r (dn - n mean(dn n)) over the group
        mean_dn_n = nl.sum(nl.multiply(dn[:, g0:g1], n_g), axis=1, keepdims=True)
        centred = nl.subtract(dn[:, g0:g1], nisa.tensor_scalar(n_g, nl.multiply, mean_dn_n, op1=nl.multiply,
                                                               operand1=1.0 / group_size))
        du[:, g0:g1] = nisa.tensor_scalar(centred, nl.multiply, inv)
    dw_rows = nl.multiply(dyt, normed)  # dLoss/dw before the partition sum
    if gated and norm_before_gate:
        dw_rows = nl.multiply(dw_rows, gate)
        dzt = nl.multiply(nl.multiply(nl.multiply(dyt, wb), normed), slope)
        dxt = du
    elif gated:
        dzt = nl.multiply(nl.multiply(du, xt), slope)
        dxt = nl.multiply(du, gate)
    else:
        dxt = du
    for j in nl.static_range((dim + FMAX - 1) // FMAX):
        hi = min(dim, (j + 1) * FMAX)
        column_sums = nisa.nc_matmul(ones_col, dw_rows[:, j * FMAX:hi])
        nl.store(dw[tile:tile + 1, j * FMAX:hi], value=nl.copy(column_sums))
    nl.store(dx[r0:r0 + Q, 0:dim], value=nl.copy(dxt, dtype=dx.dtype))
    if gated:
        nl.store(dz[r0:r0 + Q, 0:dim], value=nl.copy(dzt, dtype=dz.dtype))
    return dx, dz, dw
