"""Mamba-2's grouped gated RMSNorm as NKI kernels, forward and backward.

    norm_before_gate=False: y = rmsnorm_g(x * silu(z)) * w      (Mamba-2's choice)
    norm_before_gate=True:  y = rmsnorm_g(x) * w * silu(z)
with rmsnorm_g normalising each group of `group_size` channels. Rows (tokens) lie on the
partitions, 128 per tile and one SPMD program per tile; channels along the free axis, in pieces
of at most 512 columns. Per group, a first pass over the pieces gathers the row statistics and
keeps the normalised input (and the backward's other per-element factors) in SBUF, one fp32
row of the group per partition; a second pass writes the outputs. So a group of 5,120 channels
(Mamba-2 2.7B) needs ~60 KiB of SBUF per partition, not ten full-width tiles. The backward
re-reads only the gate input z (and dy when the gate follows the norm) in its second pass and
returns dweight per row tile ([tiles, d] fp32) for the caller to sum; w reaches every partition,
and the dweight partition sums leave it, through matmuls by ones.
"""

from __future__ import annotations

import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl
from neuronxcc import nki

Q = 128
FMAX = 512  # free size of one matmul result (a PSUM bank of fp32)


def _pieces(g0, g1):
    return [(c, min(g1, c + FMAX)) for c in range(g0, g1, FMAX)]


def _weight_piece(weight, c0, c1, ones_row):
    """w[c0:c1] on every partition: [Q, c1-c0] (PSUM)."""
    return nisa.nc_matmul(ones_row, nl.load(weight[0:1, c0:c1], dtype=nl.float32))


def _gate(zc):
    """silu(z) and its derivative sig(z) (1 + z (1 - sig(z)))."""
    sig = nisa.activation(nl.sigmoid, zc)
    slope = nl.add(sig, nl.multiply(nl.multiply(zc, sig), nl.subtract(1.0, sig)))
    return nl.multiply(zc, sig), slope


def _inv_rms(sum_sq, group_size, eps):
    return nl.rsqrt(nisa.tensor_scalar(sum_sq, nl.multiply, 1.0 / group_size, op1=nl.add, operand1=eps))


@nki.jit
def gated_rms_norm_fwd(x, z, weight, group_size, eps=1e-5, gated=True, norm_before_gate=False):
    """x, z [N, d] (N a multiple of 128; z ignored unless gated), weight [1, d] fp32.
    Grid (N / 128,). Returns y [N, d] in x's dtype."""
    dim = x.shape[1]
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    r0 = nl.program_id(0) * Q
    ones_row = nl.ones((1, Q), dtype=nl.float32)
    gate_first = gated and not norm_before_gate
    for gi in nl.static_range(dim // group_size):
        g0 = gi * group_size
        u = nl.ndarray((Q, group_size), dtype=nl.float32, buffer=nl.sbuf)  # the group's input to the norm
        sum_sq = nl.zeros((Q, 1), dtype=nl.float32)
        for c0, c1 in _pieces(g0, g0 + group_size):
            uc = nl.load(x[r0:r0 + Q, c0:c1], dtype=nl.float32)
            if gate_first:
                uc = nl.multiply(uc, _gate(nl.load(z[r0:r0 + Q, c0:c1], dtype=nl.float32))[0])
            u[:, c0 - g0:c1 - g0] = uc
            sum_sq[...] = nl.add(sum_sq, nl.sum(nl.multiply(uc, uc), axis=1, keepdims=True))
        inv = _inv_rms(sum_sq, group_size, eps)
        for c0, c1 in _pieces(g0, g0 + group_size):
            out = nl.multiply(nisa.tensor_scalar(u[:, c0 - g0:c1 - g0], nl.multiply, inv),
                              _weight_piece(weight, c0, c1, ones_row))
            if gated and norm_before_gate:
                out = nl.multiply(out, _gate(nl.load(z[r0:r0 + Q, c0:c1], dtype=nl.float32))[0])
            nl.store(y[r0:r0 + Q, c0:c1], value=nl.copy(out, dtype=y.dtype))
    return y


@nki.jit
def gated_rms_norm_bwd(x, z, weight, dy, group_size, eps=1e-5, gated=True, norm_before_gate=False):
    """Gradients of gated_rms_norm_fwd. Grid (N / 128,). Returns dx (x's dtype), dz (z's dtype;
    written only when gated) and dweight per row tile [N / 128, d] fp32."""
    dim = x.shape[1]
    dx = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    dz = nl.ndarray(z.shape, dtype=z.dtype, buffer=nl.shared_hbm)
    dw = nl.ndarray((x.shape[0] // Q, dim), dtype=nl.float32, buffer=nl.shared_hbm)
    tile = nl.program_id(0)
    r0 = tile * Q
    ones_row = nl.ones((1, Q), dtype=nl.float32)
    gate_first = gated and not norm_before_gate
    for gi in nl.static_range(dim // group_size):
        g0 = gi * group_size
        u = nl.ndarray((Q, group_size), dtype=nl.float32, buffer=nl.sbuf)  # input to the norm
        dn = nl.ndarray((Q, group_size), dtype=nl.float32, buffer=nl.sbuf)  # dLoss/d(normalised u)
        wsum = nl.ndarray((Q, group_size), dtype=nl.float32, buffer=nl.sbuf)  # dLoss/dw * rms
        sum_sq = nl.zeros((Q, 1), dtype=nl.float32)
        sum_dn_u = nl.zeros((Q, 1), dtype=nl.float32)
        for c0, c1 in _pieces(g0, g0 + group_size):
            s0, s1 = c0 - g0, c1 - g0
            uc = nl.load(x[r0:r0 + Q, c0:c1], dtype=nl.float32)
            dyc = nl.load(dy[r0:r0 + Q, c0:c1], dtype=nl.float32)
            dnc = nl.multiply(dyc, _weight_piece(weight, c0, c1, ones_row))
            if gated:
                gate = _gate(nl.load(z[r0:r0 + Q, c0:c1], dtype=nl.float32))[0]
                if gate_first:
                    uc = nl.multiply(uc, gate)
                else:
                    dnc = nl.multiply(dnc, gate)
                    dyc = nl.multiply(dyc, gate)
            u[:, s0:s1] = uc
            dn[:, s0:s1] = dnc
            wsum[:, s0:s1] = nl.multiply(dyc, uc)
            sum_sq[...] = nl.add(sum_sq, nl.sum(nl.multiply(uc, uc), axis=1, keepdims=True))
            sum_dn_u[...] = nl.add(sum_dn_u, nl.sum(nl.multiply(dnc, uc), axis=1, keepdims=True))
        inv = _inv_rms(sum_sq, group_size, eps)
        # du = inv dn - u inv^3 mean(dn u)
        coef = nl.multiply(nl.multiply(nl.multiply(inv, inv), inv), sum_dn_u)
        coef = nisa.tensor_scalar(coef, nl.multiply, 1.0 / group_size)
        for c0, c1 in _pieces(g0, g0 + group_size):
            s0, s1 = c0 - g0, c1 - g0
            uc = u[:, s0:s1]
            duc = nl.subtract(nisa.tensor_scalar(dn[:, s0:s1], nl.multiply, inv),
                              nisa.tensor_scalar(uc, nl.multiply, coef))
            # dweight: sum over rows of inv_r * (dy u [gate])_r, one matmul with inv as the stationary
            nl.store(dw[tile:tile + 1, c0:c1], value=nl.copy(nisa.nc_matmul(inv, wsum[:, s0:s1])))
            dxc = duc
            if gated:
                zc = nl.load(z[r0:r0 + Q, c0:c1], dtype=nl.float32)
                gate, slope = _gate(zc)
                if gate_first:  # u = x silu(z)
                    dxc = nl.multiply(duc, gate)
                    dzc = nl.multiply(nl.multiply(duc, nl.load(x[r0:r0 + Q, c0:c1], dtype=nl.float32)), slope)
                else:  # y = n w silu(z): dz = dy w n silu'(z)
                    dyw = nl.multiply(nl.load(dy[r0:r0 + Q, c0:c1], dtype=nl.float32),
                                      _weight_piece(weight, c0, c1, ones_row))
                    dzc = nl.multiply(nisa.tensor_scalar(nl.multiply(dyw, uc), nl.multiply, inv), slope)
                nl.store(dz[r0:r0 + Q, c0:c1], value=nl.copy(dzc, dtype=dz.dtype))
            nl.store(dx[r0:r0 + Q, c0:c1], value=nl.copy(dxc, dtype=dx.dtype))
    return dx, dz, dw
