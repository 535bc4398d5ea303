"""Single-token state updates for recurrent decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fail(message: str, error=ValueError):
    raise error(f"selective_state_update: {message}")


def _normalise(state, x, dt, A, B, C, D, z, dt_bias):
    """mamba_ssm's broadcasting: every argument without the head axis gets one (of size 1)."""
    for label, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D),
                     ("z", z), ("dt_bias", dt_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(f"{label} must be a tensor or None, got {type(t).__name__}", TypeError)
        if t is not None and not t.is_floating_point():
            _fail(f"{label} must be a floating-point tensor, got {t.dtype}", TypeError)
        if t is not None and t.device != x.device:
            _fail(f"{label} is on {t.device} but x is on {x.device}")
    if state.dim() not in (3, 4):
        _fail(f"state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got {tuple(state.shape)}")
    lift = {"state": 3, "x": 2, "dt": 2, "A": 2, "B": 2, "C": 2, "D": 1, "z": 2, "dt_bias": 1}
    axis = {"state": 1, "x": 1, "dt": 1, "A": 0, "B": 1, "C": 1, "D": 0, "z": 1, "dt_bias": 0}
    args = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    out = {}
    for label, t in args.items():
        out[label] = t.unsqueeze(axis[label]) if t is not None and t.dim() == lift[label] else t
    return out


def check_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None):
    """The shapes mamba_ssm's selective_state_update accepts, else a clear error. Returns the
    arguments with a head axis on each (see _normalise)."""
    a = _normalise(state, x, dt, A, B, C, D, z, dt_bias)
    _, nheads, dim, dstate = a["state"].shape
    if a["x"].dim() != 3 or a["x"].shape[1:] != (nheads, dim):
        _fail(f"x must be (batch, nheads, dim)=(batch, {nheads}, {dim}) or (batch, dim) for state "
              f"{tuple(state.shape)}, got {tuple(x.shape)}")
    batch = a["x"].shape[0]
    want = {"dt": (batch, nheads, dim), "z": (batch, nheads, dim), "A": (nheads, dim, dstate),
            "D": (nheads, dim), "dt_bias": (nheads, dim)}
    given = {"dt": dt, "z": z, "A": A, "D": D, "dt_bias": dt_bias}
    for label, shape in want.items():
        t = a[label]
        if t is not None and tuple(t.shape) != shape:
            _fail(f"{label} must have shape {shape} (or {shape[1:]} when nheads=1), got "
                  f"{tuple(given[label].shape)}")
    ngroups = a["B"].shape[1] if a["B"].dim() == 3 else 0
    for label in ("B", "C"):
        t = a[label]
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != dstate or ngroups < 1 or nheads % ngroups \
                or t.shape[1] != ngroups:
            _fail(f"{label} must be (batch, ngroups, dstate)=({batch}, ngroups, {dstate}) with ngroups "
                  f"dividing nheads={nheads} (B and C alike), or (batch, dstate); got B {tuple(B.shape)}, "
                  f"C {tuple(C.shape)}")
    if state_batch_indices is None:
        if a["state"].shape[0] != batch:
            _fail(f"state has {a['state'].shape[0]} rows but x has batch {batch} (pass "
                  f"state_batch_indices to pick rows from a larger state pool)")
    else:
        idx = state_batch_indices
        if not isinstance(idx, torch.Tensor):
            _fail(f"state_batch_indices must be a tensor, got {type(idx).__name__}", TypeError)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            _fail(f"state_batch_indices must be an integer tensor, got {idx.dtype}", TypeError)
        if tuple(state_batch_indices.shape) != (batch,):
            _fail(f"state_batch_indices must have shape (batch,)=({batch},), got "
                  f"{tuple(state_batch_indices.shape)}")
        if state_batch_indices.device.type == "cpu" and state_batch_indices.numel() \
                and int(state_batch_indices.max()) >= a["state"].shape[0]:
            _fail(f"state_batch_indices must be < state.shape[0]={a['state'].shape[0]}, got "
                  f"{int(state_batch_indices.max())}")
    return a


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                 dt_softplus=False, state_batch_indices=None):
    """Advance the SSM state by one token, in place, and return y (shaped like x).

    Mamba-2 (heads): state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    Mamba-1:         state [b,d,n],   x/dt/z [b,d],   A [d,n],   B/C [b,n],   D/dt_bias [d].
    Any mix of the two that mamba_ssm's selective_state_update accepts. With state_batch_indices
    [b], state is a pool and row i uses state[state_batch_indices[i]]; a negative index marks a
    padding row (output 0, no state touched).
    """
    a = check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    full_state = a["state"]
    if state_batch_indices is None:
        st = full_state
    else:
        valid = state_batch_indices >= 0
        st = full_state[state_batch_indices.long().clamp(min=0)]  # a gathered copy
    y = _update(st, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], dt_softplus)
    if state_batch_indices is not None:
        full_state[state_batch_indices[valid].long()] = st[valid]
        y = y * valid[:, None, None]
    return y if x.dim() == 3 else y.squeeze(1)


def _update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """state [b,h,p,n] updated in place; everything else with its head axis. Returns y [b,h,p]."""
    nheads, ngroups = state.shape[1], B.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = torch.where(dtf <= 20.0, F.softplus(dtf), dtf)
    Bh = B.to(acc).repeat_interleave(nheads // ngroups, dim=1)  # [b,h,n]
    Ch = C.to(acc).repeat_interleave(nheads // ngroups, dim=1)
    per_head = (A.stride(-1) == 0 and A.stride(-2) == 0 and dtf.stride(-1) == 0
                and state.dtype == acc and state.is_contiguous())
    if per_head:
        # Mamba-2: one decay per head. Update the state in place with a batched outer product
        # instead of materialising [b,h,p,n] temporaries (~15 passes over the state -> 2).
        b, h, p, n = state.shape
        dth = dtf[:, :, 0]  # [b,h]
        state.mul_(torch.exp(dth * A[:, 0, 0].to(acc))[:, :, None, None])
        flat = state.view(b * h, p, n)
        flat.baddbmm_((x.to(acc) * dth[..., None]).reshape(b * h, p, 1), Bh.reshape(b * h, 1, n))
        y = torch.bmm(flat, Ch.reshape(b * h, n, 1)).view(b, h, p)
    else:
        decay = torch.exp(dtf.unsqueeze(-1) * A.to(acc))  # [b,h,p,n]
        new_state = decay * state.to(acc) + (dtf * x.to(acc)).unsqueeze(-1) * Bh.unsqueeze(-2)
        state.copy_(new_state.to(state.dtype))
        y = (new_state * Ch.unsqueeze(-2)).sum(-1)
    if D is not None:
        y = y + x.to(acc) * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
