"""kernels' public ops take every call mamba_ssm / causal_conv1d take and give their answer
(checked against the float64 recurrences in kernels.reference), or a clear ValueError/TypeError
naming the argument and the shapes expected and found. Issue 13, items 1-8."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    selective_scan_fn,
    selective_state_update,
)
from kernels.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
    ssd_ref,
    ssd_varlen_states_ref,
)
from kernels.selective_scan import _SelectiveScanC, c_kernel_available, selective_scan_torch

f64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {
    torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-5), torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3)
}


def close(a, b, dtype=torch.float32, scale_floor=1.0):
    rtol, atol = TOL[dtype]
    scale = b.double().abs().max().clamp(min=scale_floor) if b.numel() else 1.0
    err = (a.double() - b.double()).abs().max() if b.numel() else 0.0
    assert a.shape == b.shape, (a.shape, b.shape)
    assert err <= atol + rtol * scale, f"max diff {float(err):.3g} (scale {float(scale):.3g})"


def seq_from_lengths(lengths, batch=1):
    row = torch.cat([torch.full((n, ), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    return row.expand(batch, -1).contiguous()


def scan_args(b, d, n, l, b_kind, c_kind, g=1, dtype=f64):

    def make(kind):
        return {
            "const": torch.randn(d, n, dtype=dtype), "bnl": torch.randn(b, n, l, dtype=dtype),
            "bgnl": torch.randn(b, g, n, l, dtype=dtype)
        }[kind]

    return dict(u=torch.randn(b, d, l, dtype=dtype), delta=torch.randn(b, d, l, dtype=dtype),
                A=-torch.rand(d, n, dtype=dtype) - 0.1, B=make(b_kind), C=make(c_kind))


# ---------------------------------------------------------------- 1 and 8: constant B / C
@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("b_kind,c_kind", [("bnl", "const"), ("const", "bnl"), ("const", "const"),
                                           ("bgnl", "const")])
def test_scan_with_constant_B_or_C_matches_reference(use_c, b_kind, c_kind):
    """Upstream's B/C of shape (dim, dstate): the C kernel read them out of bounds (errors ~1e34)."""
    if use_c and not c_kernel_available():
        pytest.skip("no C compiler")
    inp = scan_args(2, 6, 4, 70, b_kind, c_kind, g=2)  # 70 > one backward checkpoint segment
    D, z, bias = torch.randn(6, dtype=f64), torch.randn(2, 6, 70, dtype=f64), torch.randn(6, dtype=f64)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y_ref, s_ref = selective_scan_ref(**ref_leaves, D=D, z=z, delta_bias=bias, delta_softplus=True)
    y_ref.square().sum().backward()
    ours = {k: v.float().requires_grad_() for k, v in inp.items()}
    y, s = selective_scan_torch(**ours, D=D.float(), z=z.float(), delta_bias=bias.float(),
                                delta_softplus=True, return_last_state=True, use_c_kernel=use_c)
    y.square().sum().backward()
    close(y, y_ref)
    close(s, s_ref)
    for k in inp:
        close(ours[k].grad, ref_leaves[k].grad, scale_floor=1.0)


def test_c_kernel_checks_every_pointer_argument():
    """The last gate before C: shapes, dtypes, contiguity, device."""
    if not c_kernel_available():
        pytest.skip("no C compiler")
    u, dl, A = torch.randn(2, 4, 9), torch.rand(2, 4, 9), -torch.rand(4, 3)
    Bk = torch.randn(2, 1, 9, 3)
    cases = [(dict(B=torch.randn(2, 1, 3, 9)), ValueError,
              r"B must have shape \(2, 1, 9, 3\), got \(2, 1, 3, 9\)"),
             (dict(B=torch.randn(3, 4)), ValueError, r"B must have shape \(4, 3\), got \(3, 4\)"),
             (dict(C=torch.randn(2, 3, 9, 3)), ValueError, "groups dividing dim=4"),
             (dict(A=A.double()), TypeError, "A must be torch.float32"),
             (dict(delta=torch.rand(2, 9, 4).transpose(1, 2)), ValueError, "delta must have strides"),
             (dict(seq_idx=torch.zeros(2, 9, dtype=torch.int64)), TypeError, "seq_idx must be torch.int32"),
             (dict(u=torch.randn(2, 4, 8)), ValueError, r"delta must have shape \(2, 4, 8\)")]
    for change, error, message in cases:
        args = dict(u=u, delta=dl, A=A, B=Bk, C=Bk, seq_idx=None) | change
        with pytest.raises(error, match=message):
            _SelectiveScanC.apply(*args.values())


# ---------------------------------------------------------------- 2 and 5: causal_conv1d_update
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("extra", [0, 3])
def test_conv_update_with_state_len_width_minus_1_or_longer(width, extra):
    """Upstream takes any state_len >= width - 1; a (w-1)-long state used to broadcast (width 2,
    wrong values) or fail (widths 3-4)."""
    b, d, l = 2, 5, 9
    x, w, bias = torch.randn(b, d, l), torch.randn(d, width), torch.randn(d)
    full = causal_conv1d_fn(x, w, bias, activation="silu")
    state = torch.zeros(b, d, width - 1 + extra)
    steps = torch.stack([causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(l)], -1)
    close(steps, full)
    close(state, x[:, :, l - state.shape[-1]:])


def test_conv_update_several_tokens_ring_buffer_and_state_pool():
    b, d, width, slots, l = 3, 4, 4, 6, 3
    x, w, bias = torch.randn(b, d, l, dtype=f64), torch.randn(d, width, dtype=f64), torch.randn(d, dtype=f64)
    pool = torch.randn(5, d, slots, dtype=f64)
    cache_seqlens = torch.tensor([0, 7, 4], dtype=torch.int32)
    indices = torch.tensor([3, -1, 0], dtype=torch.int32)  # row 1 is padding
    pool_ref = pool.clone()
    y_ref = causal_conv1d_update_ref(x, pool_ref, w, bias, "silu", cache_seqlens, indices)
    y = causal_conv1d_update(x, pool, w, bias, "silu", cache_seqlens=cache_seqlens,
                             conv_state_indices=indices)
    close(y, y_ref, f64)
    close(pool, pool_ref, f64)
    assert y[1].abs().max() == 0
    # several tokens at once == one token at a time
    state_a, state_b = torch.randn(b, d, width - 1, dtype=f64), None
    state_b = state_a.clone()
    y_many = causal_conv1d_update(x, state_a, w, bias)
    y_one = torch.stack([causal_conv1d_update(x[:, :, t], state_b, w, bias) for t in range(l)], -1)
    close(y_many, y_one, f64)
    close(state_a, state_b, f64)


# ---------------------------------------------------------------- 3 and 4: causal_conv1d_fn
def test_conv_padding_positions_output_zero():
    """seq_idx = -1 marks padding; causal_conv1d returns 0 there, we returned conv outputs."""
    x, w, bias = torch.randn(2, 3, 9, dtype=f64), torch.randn(3, 4, dtype=f64), torch.randn(3, dtype=f64)
    seq = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 1, 1, 1, 1, -1]], dtype=torch.int32)
    y = causal_conv1d_fn(x, w, bias, seq_idx=seq, activation="silu")
    assert (y[seq.unsqueeze(1).expand_as(y) < 0] == 0).all()
    close(y, causal_conv1d_ref(x, w, bias, seq_idx=seq, activation="silu")[0], f64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_seq", [False, True])
def test_conv_mixed_precision_x_with_float32_weight(dtype, with_seq):
    x, w, bias = torch.randn(2, 8, 11), torch.randn(8, 4), torch.randn(8)
    seq = seq_from_lengths([5, 6], 2) if with_seq else None
    y = causal_conv1d_fn(x.to(dtype), w, bias, seq_idx=seq, activation="silu")
    assert y.dtype == dtype
    ref = causal_conv1d_ref(x.to(dtype).double(), w.double(), bias.double(), seq_idx=seq,
                            activation="silu")[0]
    close(y, ref, dtype)


# ---------------------------------------------------------------- 6: selective_state_update
def test_state_update_with_state_batch_indices_and_upstream_broadcasts():
    b, h, p, n, pool_rows = 3, 4, 2, 5, 6
    pool = torch.randn(pool_rows, h, p, n, dtype=f64)
    x, dt, z = (torch.randn(b, h, p, dtype=f64) for _ in range(3))
    A = -torch.rand(h, p, n, dtype=f64)
    B, C = torch.randn(b, n, dtype=f64), torch.randn(b, n, dtype=f64)  # (batch, dstate) with heads
    D, dt_bias = torch.randn(h, p, dtype=f64), torch.randn(h, p, dtype=f64)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    pool_ref = pool.clone()
    y_ref = selective_state_update_ref(pool_ref, x, dt, A, B[:, None], C[:, None], D, z, dt_bias, True, idx)
    y = selective_state_update(pool, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=True,
                               state_batch_indices=idx)
    close(y, y_ref, f64)
    close(pool, pool_ref, f64)
    assert y[1].abs().max() == 0
    # Mamba-1 state with a Mamba-2-shaped x (one head): mamba_ssm lifts each argument alone
    s1 = torch.randn(b, p, n, dtype=f64)
    s1_ref = s1.clone()
    y1 = selective_state_update(s1, x[:, :1], dt[:, 0], A[0], B, C)
    y1_ref = selective_state_update_ref(s1_ref, x[:, 0], dt[:, 0], A[0], B, C)
    close(y1[:, 0], y1_ref, f64)
    close(s1, s1_ref, f64)


# ---------------------------------------------------------------- 7: Mamba-2 varlen
@pytest.mark.parametrize("give_seq_idx", [False, True])
def test_ssd_cu_seqlens_and_varlen_states(give_seq_idx):
    lengths = [7, 0, 20, 1, 13]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    l, h, p, g, n = sum(lengths), 4, 3, 2, 5
    x, dt = torch.randn(1, l, h, p, dtype=f64), torch.randn(1, l, h, dtype=f64)
    A, B, C = (-torch.rand(h, dtype=f64) - 0.1, torch.randn(1, l, g, n,
                                                            dtype=f64), torch.randn(1, l, g, n, dtype=f64))
    init, dt_bias = torch.randn(1, h, p, n, dtype=f64), torch.randn(h, dtype=f64)
    seq = seq_from_lengths(lengths)
    leaves = [t.clone().requires_grad_() for t in (x, dt, B, init)]
    y, final, varlen = mamba_chunk_scan_combined(leaves[0], leaves[1], A, leaves[2], C, 8, dt_bias=dt_bias,
                                                 initial_states=leaves[3],
                                                 seq_idx=seq if give_seq_idx else None, cu_seqlens=cu,
                                                 dt_softplus=True, dt_limit=(0.0, 3.0),
                                                 return_final_states=True, return_varlen_states=True)
    ref_leaves = [t.clone().requires_grad_() for t in (x, dt, B, init)]
    y_ref, final_ref = ssd_ref(ref_leaves[0], ref_leaves[1], A, ref_leaves[2], C, dt_bias=dt_bias,
                               initial_states=ref_leaves[3], seq_idx=seq, dt_softplus=True,
                               dt_limit=(0.0, 3.0))
    varlen_ref = ssd_varlen_states_ref(ref_leaves[0], ref_leaves[1], A, ref_leaves[2], C, cu, dt_bias=dt_bias,
                                       initial_states=ref_leaves[3], dt_softplus=True, dt_limit=(0.0, 3.0))
    close(y, y_ref, f64)
    close(final, final_ref, f64)
    close(varlen, varlen_ref, f64)
    close(varlen[-1], final_ref[0], f64)
    assert varlen.shape == (len(lengths), h, p, n)
    varlen.square().sum().backward()
    varlen_ref.square().sum().backward()
    for ours, ref in zip(leaves, ref_leaves, strict=True):
        close(ours.grad, ref.grad, f64)


def test_selective_scan_cu_seqlens_equals_seq_idx():
    inp = scan_args(1, 4, 3, 30, "bnl", "bnl", dtype=torch.float32)
    cu = torch.tensor([0, 10, 25, 30], dtype=torch.int32)
    y = selective_scan_fn(**inp, delta_softplus=True, cu_seqlens=cu)
    y_seq = selective_scan_fn(**inp, delta_softplus=True, seq_idx=seq_from_lengths([10, 15, 5]))
    close(y, y_seq)
    y_ref = selective_scan_ref(**{k: v.double()
                                  for k, v in inp.items()}, delta_softplus=True,
                               seq_idx=seq_from_lengths([10, 15, 5]))[0]
    close(y, y_ref)


# ---------------------------------------------------------------- properties
@st.composite
def scan_case(draw):
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    g = draw(st.sampled_from([1, 2, 3]))
    d = g * draw(st.integers(1, 3))
    l = draw(st.integers(1, 80))
    kinds = st.sampled_from(["const", "bnl", "bgnl"])
    return dict(b=b, d=d, n=n, l=l, g=g, b_kind=draw(kinds), c_kind=draw(kinds),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                D=draw(st.booleans()), z=draw(st.booleans()), bias=draw(st.booleans()),
                softplus=draw(st.booleans()), docs=draw(st.booleans()), use_c=draw(st.booleans()))


@PROPERTY
@given(scan_case())
def test_property_selective_scan(c):
    inp = scan_args(c["b"], c["d"], c["n"], c["l"], c["b_kind"], c["c_kind"], c["g"])
    extra = dict(D=torch.randn(c["d"], dtype=f64) if c["D"] else None,
                 z=torch.randn(c["b"], c["d"], c["l"], dtype=f64) if c["z"] else None,
                 delta_bias=torch.randn(c["d"], dtype=f64) if c["bias"] else None)
    seq = torch.randint(0, 3, (c["b"], c["l"])).sort(dim=1).values.int() if c["docs"] else None
    y_ref, s_ref = selective_scan_ref(**inp, **extra, delta_softplus=c["softplus"], seq_idx=seq)
    dt = c["dtype"]
    y, s = selective_scan_torch(**{k: v.to(dt)
                                   for k, v in inp.items()},
                                **{k: None if v is None else v.to(dt)
                                   for k, v in extra.items()}, delta_softplus=c["softplus"],
                                return_last_state=True, seq_idx=seq, use_c_kernel=c["use_c"] and dt != f64
                                and c_kernel_available())
    assert y.dtype == dt
    # low-precision inputs: compare with the reference on the same rounded inputs
    if dt != f64:
        y_ref, s_ref = selective_scan_ref(
            **{k: v.to(dt).double()
               for k, v in inp.items()},
            **{k: None if v is None else v.to(dt).double()
               for k, v in extra.items()}, delta_softplus=c["softplus"], seq_idx=seq)
    close(y, y_ref, dt, scale_floor=1.0)
    close(s, s_ref, torch.float32 if dt == torch.bfloat16 else dt, scale_floor=1.0)


@st.composite
def conv_case(draw):
    return dict(b=draw(st.integers(1, 2)), d=draw(st.integers(1, 5)), l=draw(st.integers(1, 12)),
                width=draw(st.integers(1, 5)), bias=draw(st.booleans()), init=draw(st.booleans()),
                seq=draw(st.sampled_from([None, "docs", "padded"
                                          ])), activation=draw(st.sampled_from([None, "silu", "swish"])),
                x_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                w_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))


@PROPERTY
@given(conv_case())
def test_property_causal_conv1d(c):
    b, d, l, width = c["b"], c["d"], c["l"], c["width"]
    x = torch.randn(b, d, l).to(c["x_dtype"])
    w, bias = torch.randn(d, width).to(c["w_dtype"]), torch.randn(d).to(c["w_dtype"]) if c["bias"] else None
    init = torch.randn(b, d, width - 1).to(c["x_dtype"]) if c["init"] else None
    seq = None
    if c["seq"]:
        seq = torch.randint(0, 3, (b, l)).sort(dim=1).values.int()
        if c["seq"] == "padded":
            seq = seq - (torch.rand(b, l) < 0.3).int() * (seq + 1)  # some positions -> -1
    y, final = causal_conv1d_fn(x, w, bias, seq_idx=seq, initial_states=init, return_final_states=True,
                                activation=c["activation"])
    y_ref, final_ref = causal_conv1d_ref(x.double(), w.double(), None if bias is None else bias.double(),
                                         seq_idx=seq, initial_states=None if init is None else init.double(),
                                         activation=c["activation"])
    low = (torch.bfloat16 if torch.bfloat16 in (c["x_dtype"], c["w_dtype"]) else
           (torch.float16 if c["x_dtype"] == torch.float16 else torch.float32))
    assert y.dtype == c["x_dtype"] and final.shape == (b, d, width - 1)
    close(y, y_ref, low)
    close(final, final_ref.to(c["x_dtype"]), f64)


@st.composite
def update_case(draw):
    width = draw(st.integers(1, 5))
    return dict(b=draw(st.integers(1, 3)), d=draw(st.integers(1, 4)), width=width,
                slots=width - 1 + draw(st.integers(0, 4)), l=draw(st.sampled_from([None, 1, 2, 5])),
                ring=draw(st.booleans()), pool=draw(st.booleans()), bias=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "silu"])))


@PROPERTY
@given(update_case())
def test_property_causal_conv1d_update(c):
    b, d, width, slots = c["b"], c["d"], c["width"], c["slots"]
    if c["ring"] and slots == 0:
        slots = 1
    x = torch.randn(b, d, dtype=f64) if c["l"] is None else torch.randn(b, d, c["l"], dtype=f64)
    w, bias = torch.randn(d, width, dtype=f64), torch.randn(d, dtype=f64) if c["bias"] else None
    rows = b + 2 if c["pool"] else b
    state = torch.randn(rows, d, slots, dtype=f64)
    idx = torch.randperm(rows)[:b].int() if c["pool"] else None
    if idx is not None and b > 1:
        idx[0] = -1
    cache = torch.randint(0, 20, (b, ), dtype=torch.int32) if c["ring"] else None
    state_ref = state.clone()
    y_ref = causal_conv1d_update_ref(x, state_ref, w, bias, c["activation"], cache, idx)
    y = causal_conv1d_update(x, state, w, bias, c["activation"], cache_seqlens=cache, conv_state_indices=idx)
    close(y, y_ref, f64)
    close(state, state_ref, f64)


@st.composite
def step_case(draw):
    g = draw(st.sampled_from([1, 2]))
    return dict(b=draw(st.integers(1, 3)), heads=draw(st.booleans()), h=g * draw(st.integers(1, 2)), g=g,
                p=draw(st.integers(1, 4)), n=draw(st.integers(1, 6)), D=draw(st.booleans()),
                z=draw(st.booleans()), bias=draw(st.booleans()), softplus=draw(st.booleans()),
                pool=draw(st.booleans()), tied=draw(st.booleans()), bc_2d=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


@PROPERTY
@given(step_case())
def test_property_selective_state_update(c):
    b, h, g, p, n, dt_ = c["b"], c["h"], c["g"], c["p"], c["n"], c["dtype"]
    if not c["heads"]:
        h = g = 1
    rows = b + 2 if c["pool"] else b
    state = torch.randn(rows, h, p, n, dtype=f64)
    x, z = torch.randn(b, h, p, dtype=f64), torch.randn(b, h, p, dtype=f64)
    if c["tied"]:  # Mamba-2: one dt and A per head, expanded (stride 0), as the model passes them
        dt = torch.randn(b, h, 1, dtype=f64).expand(-1, -1, p)
        A = (-torch.rand(h, 1, 1, dtype=f64)).expand(-1, p, n)
    else:
        dt, A = torch.randn(b, h, p, dtype=f64), -torch.rand(h, p, n, dtype=f64)
    gg = 1 if c["bc_2d"] else g
    B, C = torch.randn(b, gg, n, dtype=f64), torch.randn(b, gg, n, dtype=f64)
    D = torch.randn(h, p, dtype=f64) if c["D"] else None
    bias = torch.randn(h, p, dtype=f64) if c["bias"] else None
    idx = torch.randperm(rows)[:b].int() if c["pool"] else None
    state_ref = state.clone()
    y_ref = selective_state_update_ref(state_ref, x, dt, A, B, C, D, z if c["z"] else None, bias,
                                       c["softplus"], idx)

    def cast(t, squeeze_dim=None):
        if t is None:
            return None
        t = t.to(dt_)
        return t.squeeze(squeeze_dim) if squeeze_dim is not None and not c["heads"] else t

    ours_state = state.to(dt_)
    Bo, Co = (B[:, 0], C[:, 0]) if c["bc_2d"] else (B, C)
    y = selective_state_update(
        cast(ours_state, 1) if not c["heads"] else ours_state, cast(x, 1), cast(dt, 1), cast(A,
                                                                                             0), Bo.to(dt_),
        Co.to(dt_), cast(D, 0),
        cast(z, 1) if c["z"] else None, dt_bias=cast(bias, 0), dt_softplus=c["softplus"],
        state_batch_indices=idx)
    close(y, y_ref if c["heads"] else y_ref[:, 0], dt_)
    close(ours_state, state_ref, dt_)


@st.composite
def ssd_case(draw):
    g = draw(st.sampled_from([1, 2]))
    lengths = draw(st.lists(st.integers(0, 20), min_size=1, max_size=4).filter(lambda v: sum(v) > 0))
    return dict(lengths=lengths, h=g * draw(st.integers(1, 2)), g=g, p=draw(st.integers(1, 3)),
                n=draw(st.integers(1, 4)), chunk=draw(st.sampled_from([4, 16, 256])),
                D=draw(st.sampled_from([None, "h", "hp"])), z=draw(st.booleans()), init=draw(st.booleans()),
                bias=draw(st.booleans()), softplus=draw(st.booleans()),
                limit=draw(st.sampled_from([(0.0, math.inf), (0.01, 0.5)])), with_seq=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


@PROPERTY
@given(ssd_case())
def test_property_ssd_varlen(c):
    lengths, h, g, p, n, dt_ = c["lengths"], c["h"], c["g"], c["p"], c["n"], c["dtype"]
    l = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq = seq_from_lengths(lengths)
    x, dt = torch.randn(1, l, h, p, dtype=f64), torch.randn(1, l, h, dtype=f64)
    A, B, C = (-torch.rand(h, dtype=f64) - 0.05, torch.randn(1, l, g, n,
                                                             dtype=f64), torch.randn(1, l, g, n, dtype=f64))
    D = {None: None, "h": torch.randn(h, dtype=f64), "hp": torch.randn(h, p, dtype=f64)}[c["D"]]
    z = torch.randn(1, l, h, p, dtype=f64) if c["z"] else None
    init = torch.randn(1, h, p, n, dtype=f64) if c["init"] else None
    bias = torch.randn(h, dtype=f64) if c["bias"] else None
    kw = dict(dt_bias=bias, initial_states=init, dt_softplus=c["softplus"], dt_limit=c["limit"])
    y_ref, final_ref = ssd_ref(x, dt, A, B, C, D=D, z=z, seq_idx=seq, **kw)
    varlen_ref = ssd_varlen_states_ref(x, dt, A, B, C, cu, **kw)

    def cast(t):
        return None if t is None else t.to(dt_)

    y, final, varlen = mamba_chunk_scan_combined(cast(x), cast(dt), cast(A), cast(B), cast(C), c["chunk"],
                                                 D=cast(D), z=cast(z), dt_bias=cast(bias),
                                                 initial_states=cast(init),
                                                 seq_idx=seq if c["with_seq"] else None, cu_seqlens=cu,
                                                 dt_softplus=c["softplus"], dt_limit=c["limit"],
                                                 return_final_states=True, return_varlen_states=True)
    close(y, y_ref, dt_)
    close(final, final_ref, dt_)
    close(varlen, varlen_ref, dt_)


# ---------------------------------------------------------------- illegal calls
def _scan_ok():
    return scan_args(2, 4, 3, 7, "bnl", "bnl", dtype=torch.float32)


def _conv_ok():
    return dict(x=torch.randn(2, 4, 7), weight=torch.randn(4, 3))


def _update_ok():
    return dict(x=torch.randn(2, 4), conv_state=torch.randn(2, 4, 3), weight=torch.randn(4, 3))


def _step_ok():
    return dict(state=torch.randn(2, 4, 3, 5), x=torch.randn(2, 4, 3), dt=torch.randn(2, 4, 3),
                A=-torch.rand(4, 3, 5), B=torch.randn(2, 2, 5), C=torch.randn(2, 2, 5))


def _ssd_ok():
    return dict(x=torch.randn(1, 9, 4, 3), dt=torch.randn(1, 9, 4), A=-torch.rand(4),
                B=torch.randn(1, 9, 2, 5), C=torch.randn(1, 9, 2, 5), chunk_size=4)


def _inner_ok():
    d, n, r = 4, 3, 2
    return dict(xz=torch.randn(2, 2 * d, 7), conv1d_weight=torch.randn(d, 1, 4), conv1d_bias=None,
                x_proj_weight=torch.randn(r + 2 * n, d), delta_proj_weight=torch.randn(d, r),
                out_proj_weight=torch.randn(5, d), out_proj_bias=None, A=-torch.rand(d, n))


def _split_ok():
    h, p, g, n = 2, 3, 1, 4
    conv_dim = h * p + 2 * g * n
    return dict(zxbcdt=torch.randn(2, 7, h * p + conv_dim + h), conv1d_weight=torch.randn(conv_dim, 4),
                conv1d_bias=None, dt_bias=torch.randn(h), A=-torch.rand(h), D=torch.randn(h, p), chunk_size=4)


ILLEGAL = [
    (mamba_inner_fn, _inner_ok, dict(x_proj_weight=torch.randn(7, 4)), ValueError,
     r"x_proj_weight must be .*\(8, 4\)"),
    (mamba_inner_fn, _inner_ok, dict(xz=torch.randn(2, 7, 7)), ValueError, r"xz must be .* got \(2, 7, 7\)"),
    (mamba_inner_fn, _inner_ok, dict(conv1d_weight=torch.randn(5, 1, 4)), ValueError,
     "conv1d_weight must be"),
    (mamba_inner_fn, _inner_ok, dict(B=torch.randn(2, 3, 6)), ValueError, r"B must be .* got \(2, 3, 6\)"),
    (mamba_split_conv1d_scan_combined, _split_ok, dict(zxbcdt=torch.randn(2, 7, 21)), ValueError,
     "zxbcdt's last axis"),
    (mamba_split_conv1d_scan_combined, _split_ok, dict(D=torch.randn(2)), ValueError, "needs headdim"),
    (mamba_split_conv1d_scan_combined, _split_ok, dict(dt_bias=torch.randn(3)), ValueError,
     "dt_bias must have"),
    (mamba_split_conv1d_scan_combined, _split_ok, dict(conv1d_weight=torch.randn(13, 4)), ValueError,
     "conv1d_weight must have"),
    (selective_scan_fn, _scan_ok, dict(B=torch.randn(2, 3, 8)), ValueError, r"B must be .* got \(2, 3, 8\)"),
    (selective_scan_fn, _scan_ok, dict(C=torch.randn(3, 4)), ValueError, r"C must be .* got \(3, 4\)"),
    (selective_scan_fn, _scan_ok, dict(B=torch.randn(2, 3, 3, 7)), ValueError, "ngroups dividing dim=4"),
    (selective_scan_fn, _scan_ok, dict(delta=torch.randn(2, 4, 6)), ValueError,
     r"delta must .* got \(2, 4, 6\)"),
    (selective_scan_fn, _scan_ok, dict(A=torch.randn(5, 3)), ValueError, r"A must be .* got \(5, 3\)"),
    (selective_scan_fn, _scan_ok, dict(D=torch.randn(5)), ValueError,
     r"D must have shape \(4,\), got \(5,\)"),
    (selective_scan_fn, _scan_ok, dict(z=torch.randn(2, 4, 6)), ValueError, r"z must have shape"),
    (selective_scan_fn, _scan_ok, dict(delta_bias=torch.randn(4, 1)), ValueError,
     "delta_bias must have shape"),
    (selective_scan_fn, _scan_ok, dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), ValueError, "seq_idx"),
    (selective_scan_fn, _scan_ok, dict(seq_idx=torch.zeros(2, 7)), TypeError, "seq_idx must be an integer"),
    (selective_scan_fn, _scan_ok, dict(cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "end at seqlen=7"),
    (selective_scan_fn, _scan_ok, dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "complex"),
    (causal_conv1d_fn, _conv_ok, dict(weight=torch.randn(4, 1, 3)), ValueError, r"squeeze\(1\)"),
    (causal_conv1d_fn, _conv_ok, dict(x=torch.randn(2, 5, 7)), ValueError, r"x must be .* got \(2, 5, 7\)"),
    (causal_conv1d_fn, _conv_ok, dict(bias=torch.randn(3)), ValueError,
     r"bias must have shape \(dim,\)=\(4,\)"),
    (causal_conv1d_fn, _conv_ok, dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), ValueError, "seq_idx"),
    (causal_conv1d_fn, _conv_ok, dict(initial_states=torch.randn(2, 4, 3)), ValueError, "initial_states"),
    (causal_conv1d_fn, _conv_ok, dict(activation="relu"), ValueError, "activation='relu'"),
    (causal_conv1d_update, _update_ok, dict(conv_state=torch.randn(2, 4, 1)), ValueError,
     "state_len >= width"),
    (causal_conv1d_update, _update_ok, dict(conv_state=torch.randn(3, 4, 3)), ValueError,
     "conv_state_indices"),
    (causal_conv1d_update, _update_ok, dict(x=torch.randn(2, 5)), ValueError, r"got \(2, 5\)"),
    (causal_conv1d_update, _update_ok, dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError,
     "cache_seqlens must have shape"),
    (causal_conv1d_update, _update_ok, dict(conv_state_indices=torch.tensor([0, 2])), ValueError,
     r"conv_state_indices must be < conv_state.shape\[0\]=2"),
    (selective_state_update, _step_ok, dict(B=torch.randn(2, 3, 5)), ValueError, "ngroups dividing nheads=4"),
    (selective_state_update, _step_ok, dict(C=torch.randn(2, 1, 5)), ValueError, "B and C alike"),
    (selective_state_update, _step_ok, dict(A=-torch.rand(4, 5)), ValueError,
     r"A must have shape \(4, 3, 5\)"),
    (selective_state_update, _step_ok, dict(dt=torch.randn(2, 4)), ValueError, "dt must have shape"),
    (selective_state_update, _step_ok, dict(state=torch.randn(3, 4, 3, 5)), ValueError,
     "state_batch_indices"),
    (selective_state_update, _step_ok, dict(D=torch.randn(4)), ValueError, r"D must have shape \(4, 3\)"),
    (selective_state_update, _step_ok, dict(state_batch_indices=torch.tensor([0.0, 1.0])), TypeError,
     "integer"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(B=torch.randn(1, 9, 3, 5)), ValueError, "ngroups dividing"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(C=torch.randn(1, 9, 2, 4)), ValueError, r"C must have shape"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(dt=torch.randn(1, 9, 4, 1)), ValueError, "dt must have shape"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(D=torch.randn(3)), ValueError, "D must have shape"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(initial_states=torch.randn(1, 4, 3, 4)), ValueError,
     "initial_states must have shape"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(chunk_size=0), TypeError, "chunk_size must be a positive int"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(cu_seqlens=torch.tensor([0, 4, 8])), ValueError,
     "end at seqlen=9"),
    (mamba_chunk_scan_combined, _ssd_ok,
     dict(cu_seqlens=torch.tensor([0, 4, 9]), seq_idx=seq_from_lengths([5,
                                                                        4])), ValueError, "make them agree"),
    (mamba_chunk_scan_combined, _ssd_ok, dict(return_varlen_states=True), ValueError, "needs cu_seqlens")
]


@pytest.mark.parametrize("op,ok,change,error,message", ILLEGAL,
                         ids=[f"{op.__name__}-{i}" for i, (op, *_rest) in enumerate(ILLEGAL)])
def test_illegal_calls_raise_a_clear_error(op, ok, change, error, message):
    op(**ok())  # the unchanged call is legal
    with pytest.raises(error, match=message):
        op(**(ok() | change))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.sampled_from(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]), st.integers(0, 3),
       st.sampled_from([-1, 1, 2]), st.booleans())
def test_property_mutated_scan_shapes_raise_or_match_reference(arg, axis, step, use_c):
    """Changing one dimension of one argument either raises ValueError before any compiled code
    runs, or is still a legal call (e.g. another group count) and matches the reference."""
    inp = scan_args(2, 4, 3, 7, "bgnl", "bgnl", g=2)
    inp |= dict(D=torch.randn(4, dtype=f64), z=torch.randn(2, 4, 7, dtype=f64),
                delta_bias=torch.randn(4, dtype=f64))
    t = inp[arg]
    if axis >= t.dim() or t.shape[axis] + step < 1:
        return
    shape = list(t.shape)
    shape[axis] += step
    inp[arg] = torch.randn(shape, dtype=f64) if arg != "A" else -torch.rand(shape, dtype=f64)
    try:
        y = selective_scan_torch(**{k: v.float()
                                    for k, v in inp.items()}, delta_softplus=True, use_c_kernel=use_c
                                 and c_kernel_available())
    except ValueError as exc:
        assert "must" in str(exc) and "got" in str(exc)
        return
    close(y, selective_scan_ref(**inp, delta_softplus=True)[0])


# ---------------------------------------------------------------- the C decode kernels' gate
@pytest.mark.parametrize("step", ["mamba2_step", "mamba1_block_step"])
def test_decode_steps_with_a_width_minus_1_conv_state(step):
    """A conv state of width - 1 columns is legal for causal_conv1d_update; the fused C decode
    steps read width columns per channel, so such calls must take the torch composition (the
    C kernel used to run on them and read past each channel's state)."""
    from kernels import dispatch

    b, width = 2, 4
    if step == "mamba2_step":
        h, p, n, g = 4, 3, 5, 2
        conv_dim = h * p + 2 * g * n
        zx = torch.randn(b, h * p + conv_dim + h)
        weights = (torch.randn(conv_dim, width), torch.randn(conv_dim), -torch.rand(h), torch.randn(h),
                   torch.randn(h), torch.randn(h * p))
        states = (torch.randn(b, conv_dim, width), torch.randn(b, h, p, n))

        def run(conv_state, ssm_state):
            return dispatch.mamba2_step(zx, conv_state, ssm_state, *weights, ngroups=g)
    else:
        d_model, d_inner, n, r = 6, 8, 4, 2
        hidden = torch.randn(b, d_model)
        weights = (torch.ones(d_model), 1e-5, torch.randn(2 * d_inner, d_model), None)
        rest = (torch.randn(d_inner, width), torch.randn(d_inner), torch.randn(r + 2 * n, d_inner),
                torch.randn(d_inner, r), torch.randn(d_inner), -torch.rand(d_inner, n), torch.randn(d_inner),
                torch.randn(d_model, d_inner))
        states = (torch.randn(b, d_inner, width), torch.randn(b, d_inner, n))

        def run(conv_state, ssm_state):
            return dispatch.mamba1_block_step(hidden, None, *weights, conv_state, ssm_state, *rest)[0]

    full = [s.clone() for s in states]
    short = [states[0][:, :, 1:].clone(), states[1].clone()]  # the same history, one column shorter
    with torch.no_grad():
        close(run(*short), run(*full))
    close(short[0], full[0][:, :, 1:])
    close(short[1], full[1])


# ---------------------------------------------------------------- 8: the fused upstream entry points
def test_mamba_inner_fn_equals_our_mamba1_mixer():
    """state-spaces' Mamba.forward fast path is one mamba_inner_fn call on the module's weights."""
    from mamba.model.mamba1 import Mamba1

    mixer = Mamba1(d_model=8, d_state=4, d_conv=3, bias=True)
    hidden = torch.randn(2, 11, 8)
    seq = seq_from_lengths([4, 7], 2)
    with torch.no_grad():
        want = mixer(hidden, seq_idx=seq)
        xz = mixer.in_proj(hidden).transpose(1, 2)
        got = mamba_inner_fn(xz, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight,
                             mixer.dt_proj.weight, mixer.out_proj.weight, mixer.out_proj.bias,
                             -torch.exp(mixer.A_log.float()), None, None, mixer.D.float(),
                             delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True, seq_idx=seq)
    close(got, want)


@pytest.mark.parametrize("constant_B,varlen", [(False, False), (True, False), (False, True)])
def test_mamba_inner_fn_matches_reference(constant_B, varlen):

    b, d, l, n, r, o, w = (1 if varlen else 2), 6, 13, 4, 2, 5, 4
    xz = torch.randn(b, 2 * d, l, dtype=f64)
    conv_w, conv_b = torch.randn(d, 1, w, dtype=f64), torch.randn(d, dtype=f64)
    x_proj = torch.randn(r + (1 if constant_B else 2) * n, d, dtype=f64) * 0.5
    dt_proj, out_w, out_b = (torch.randn(d, r, dtype=f64), torch.randn(o, d,
                                                                       dtype=f64), torch.randn(o, dtype=f64))
    A, D, dt_bias = -torch.rand(d, n, dtype=f64) - 0.1, torch.randn(d, dtype=f64), torch.randn(d, dtype=f64)
    Bconst = torch.randn(d, n, dtype=f64) if constant_B else None
    c_bias = torch.randn(n, dtype=f64)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32) if varlen else None
    seq = seq_from_lengths([5, 8]) if varlen else None
    leaves = [t.clone().requires_grad_() for t in (xz, conv_w, x_proj, dt_proj, out_w)]
    got = mamba_inner_fn(leaves[0], leaves[1], conv_b, leaves[2], leaves[3], leaves[4], out_b, A, Bconst,
                         None, D, dt_bias, None, c_bias, True, cu_seqlens=cu)
    ref_leaves = [t.clone().requires_grad_() for t in (xz, conv_w, x_proj, dt_proj, out_w)]
    x, z = ref_leaves[0].chunk(2, dim=1)
    x = causal_conv1d_ref(x, ref_leaves[1][:, 0], conv_b, seq_idx=seq, activation="silu")[0]
    x_dbl = x.transpose(1, 2) @ ref_leaves[2].T
    delta = (x_dbl[..., :r] @ ref_leaves[3].T).transpose(1, 2)
    B = Bconst if constant_B else x_dbl[..., r:r + n].transpose(1, 2)
    C = (x_dbl[..., -n:] + c_bias).transpose(1, 2)
    y = selective_scan_ref(x, delta, A, B, C, D, z, dt_bias, delta_softplus=True, seq_idx=seq)[0]
    want = y.transpose(1, 2) @ ref_leaves[4].T + out_b
    close(got, want, f64)
    got.square().sum().backward()
    want.square().sum().backward()
    for ours, ref in zip(leaves, ref_leaves, strict=True):
        close(ours.grad, ref.grad, f64)


def test_mamba_split_conv1d_scan_combined_equals_our_mamba2_mixer():
    """state-spaces' Mamba2.forward memory-efficient path is one such call on the module's weights."""
    from mamba.model.mamba2 import Mamba2

    mixer = Mamba2(d_model=8, d_state=4, d_conv=3, headdim=4, ngroups=2, chunk_size=8)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, 11, 8)
    seq = seq_from_lengths([6, 5], 2)
    with torch.no_grad():
        want = mixer(hidden, seq_idx=seq)
        got = mamba_split_conv1d_scan_combined(
            mixer.in_proj(hidden), mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias,
            -torch.exp(mixer.A_log.float()), mixer.D, mixer.chunk_size, seq_idx=seq, dt_limit=mixer.dt_limit,
            rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.eps,
            outproj_weight=mixer.out_proj.weight, outproj_bias=mixer.out_proj.bias, headdim=mixer.headdim,
            ngroups=mixer.ngroups, norm_before_gate=False)
    close(got, want)


@pytest.mark.parametrize("norm,before,d_mlp", [(True, True, 0), (True, False, 3), (False, False, 0)])
def test_mamba_split_conv1d_scan_combined_matches_reference(norm, before, d_mlp):
    from kernels.reference import rms_norm_gated_ref

    b, l, h, p, g, n, w, o = 2, 10, 4, 3, 2, 5, 4, 7
    dim, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = torch.randn(b, l, 2 * d_mlp + dim + conv_dim + h, dtype=f64)
    conv_w, conv_b = torch.randn(conv_dim, w, dtype=f64), torch.randn(conv_dim, dtype=f64)
    dt_bias, A, D = torch.randn(h, dtype=f64), -torch.rand(h, dtype=f64) - 0.1, torch.randn(h, p, dtype=f64)
    norm_w = torch.rand(dim, dtype=f64) + 0.5 if norm else None
    out_w, out_b = torch.randn(o, d_mlp + dim, dtype=f64), torch.randn(o, dtype=f64)
    init, seq = torch.randn(b, h, p, n, dtype=f64), seq_from_lengths([4, 6], b)
    got, final = mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, 4,
                                                  initial_states=init, seq_idx=seq, dt_limit=(0.0, 2.0),
                                                  return_final_states=True, rmsnorm_weight=norm_w,
                                                  rmsnorm_eps=1e-5, outproj_weight=out_w, outproj_bias=out_b,
                                                  ngroups=g, norm_before_gate=before)
    mlp, z, xBC, dt = zxbcdt.split([2 * d_mlp, dim, conv_dim, h], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), conv_w, conv_b, seq_idx=seq,
                            activation="silu")[0].transpose(1, 2)
    x, B, C = xBC.split([dim, g * n, g * n], dim=-1)
    y, final_ref = ssd_ref(x.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n), D=D,
                           z=None if norm else z.reshape(b, l, h, p), dt_bias=dt_bias, initial_states=init,
                           seq_idx=seq, dt_softplus=True, dt_limit=(0.0, 2.0))
    y = y.reshape(b, l, dim)
    if norm:
        y = rms_norm_gated_ref(y, norm_w, z, 1e-5, g, before)
    if d_mlp:
        y = torch.cat([torch.nn.functional.silu(mlp[..., :d_mlp]) * mlp[..., d_mlp:], y], dim=-1)
    close(got, y @ out_w.T + out_b, torch.float32 if norm else f64)  # kernels.norm works in float32
    close(final, final_ref, f64)


def _mutation_cases():
    """name -> (legal float64 arguments, our op, the reference op); both return one tensor."""
    h, p, g, n, l = 4, 2, 2, 3, 9
    conv = dict(x=torch.randn(2, 3, l, dtype=f64), weight=torch.randn(3, 4, dtype=f64),
                bias=torch.randn(3, dtype=f64), initial_states=torch.randn(2, 3, 3, dtype=f64))
    update = dict(x=torch.randn(2, 3, 2, dtype=f64), conv_state=torch.randn(2, 3, 4, dtype=f64),
                  weight=torch.randn(3, 4, dtype=f64), bias=torch.randn(3, dtype=f64))
    step = dict(state=torch.randn(2, h, p, n, dtype=f64), x=torch.randn(2, h, p, dtype=f64),
                dt=torch.randn(2, h, p, dtype=f64), A=-torch.rand(h, p, n, dtype=f64),
                B=torch.randn(2, g, n, dtype=f64), C=torch.randn(2, g, n,
                                                                 dtype=f64), D=torch.randn(h, p, dtype=f64),
                z=torch.randn(2, h, p, dtype=f64), dt_bias=torch.randn(h, p, dtype=f64))
    ssd = dict(x=torch.randn(2, l, h, p, dtype=f64), dt=torch.randn(2, l, h, dtype=f64),
               A=-torch.rand(h, dtype=f64), B=torch.randn(2, l, g, n,
                                                          dtype=f64), C=torch.randn(2, l, g, n, dtype=f64),
               D=torch.randn(h, dtype=f64), z=torch.randn(2, l, h, p, dtype=f64),
               dt_bias=torch.randn(h, dtype=f64), initial_states=torch.randn(2, h, p, n, dtype=f64))

    def step_ours(**kw):
        return selective_state_update(**kw, dt_softplus=True)

    def step_ref(**kw):
        return selective_state_update_ref(**kw, dt_softplus=True)

    return {
        "conv": (conv, lambda **kw: causal_conv1d_fn(**kw, activation="silu"),
                 lambda **kw: causal_conv1d_ref(**kw, activation="silu")[0]),
        "update": (update, causal_conv1d_update, causal_conv1d_update_ref),
        "step": (step, step_ours, step_ref),
        "ssd": (ssd, lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=4, dt_softplus=True),
                lambda **kw: ssd_ref(**kw, dt_softplus=True)[0])
    }


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_property_mutated_shapes_raise_or_match_reference(data):
    """For every op: change one dimension of one argument. Ours either raises a clear
    ValueError/TypeError, or the call is still legal and matches the reference. Never a
    finite-but-wrong answer."""
    name = data.draw(st.sampled_from(["conv", "update", "step", "ssd"]))
    kw, ours, ref = _mutation_cases()[name]
    arg = data.draw(st.sampled_from(sorted(kw)))
    axis = data.draw(st.integers(0, kw[arg].dim() - 1))
    shape = list(kw[arg].shape)
    shape[axis] = max(1, shape[axis] + data.draw(st.sampled_from([-1, 1, 2])))
    kw[arg] = torch.randn(shape, dtype=f64) if arg != "A" else -torch.rand(shape, dtype=f64)
    try:
        got = ours(**{k: v.clone() for k, v in kw.items()})
    except (ValueError, TypeError) as exc:
        assert "got" in str(exc) or "must" in str(exc), str(exc)
        return
    try:
        want = ref(**kw)
    except (RuntimeError, IndexError, ValueError, AssertionError) as exc:
        pytest.fail(f"{name}: {arg}{tuple(shape)} was accepted, but the reference cannot run it: {exc}")
    close(got, want, f64)


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 40), st.sampled_from([(2, 1), (4, 2), (3, 3)]), st.integers(1, 3),
       st.integers(1, 4), st.booleans(), st.booleans(),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_property_ssd_batched(b, l, heads_groups, p, n, with_docs, with_init, dtype):
    """Batched rows (no cu_seqlens), packed documents per row, low-precision inputs."""
    h, g = heads_groups
    x, dt = torch.randn(b, l, h, p, dtype=f64), torch.randn(b, l, h, dtype=f64)
    A, B, C = (-torch.rand(h, dtype=f64) - 0.05, torch.randn(b, l, g, n,
                                                             dtype=f64), torch.randn(b, l, g, n, dtype=f64))
    D, z, bias = torch.randn(h, p, dtype=f64), torch.randn(b, l, h, p, dtype=f64), torch.randn(h, dtype=f64)
    init = torch.randn(b, h, p, n, dtype=f64) if with_init else None
    seq = torch.randint(0, 3, (b, l)).sort(dim=1).values.int() if with_docs else None
    args = [t.to(dtype) for t in (x, dt, A, B, C)]
    y, final = mamba_chunk_scan_combined(*args, 16, D=D.to(dtype), z=z.to(dtype), dt_bias=bias.to(dtype),
                                         initial_states=None if init is None else init.to(dtype), seq_idx=seq,
                                         dt_softplus=True, return_final_states=True)
    rounded = [t.double() for t in args]
    y_ref, final_ref = ssd_ref(*rounded, D=D.to(dtype).double(), z=z.to(dtype).double(),
                               dt_bias=bias.to(dtype).double(),
                               initial_states=None if init is None else init.to(dtype).double(), seq_idx=seq,
                               dt_softplus=True)
    assert y.dtype == dtype
    close(y, y_ref, dtype)
    close(final, final_ref, torch.float32 if dtype == torch.bfloat16 else dtype)
