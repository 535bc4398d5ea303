"""Single-token state updates for recurrent decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                 dt_softplus=False):
    """Advance the SSM state by one token, in place, and return y.

    Mamba-2 (heads): state [b,h,p,n], x/dt/z [b,h,p], A [h,p,n], B/C [b,g,n], D/dt_bias [h,p].
    Mamba-1:         state [b,d,n],   x/dt/z [b,d],   A [d,n],   B/C [b,n],   D/dt_bias [d].
    (The same broadcasting mamba_ssm's selective_state_update accepts.)
    """
    has_heads = state.dim() == 4
    if not has_heads:
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    nheads, ngroups = state.shape[1], B.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = torch.where(dtf <= 20.0, F.softplus(dtf), dtf)
    Bh = B.to(acc).repeat_interleave(nheads // ngroups, dim=1)  # [b,h,n]
    Ch = C.to(acc).repeat_interleave(nheads // ngroups, dim=1)
    per_head = (has_heads and A.stride(-1) == 0 and A.stride(-2) == 0 and dtf.stride(-1) == 0
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
        if D is not None:
            y = y + x.to(acc) * D.to(acc)
        if z is not None:
            y = y * F.silu(z.to(acc))
        return y.to(x.dtype)
    decay = torch.exp(dtf.unsqueeze(-1) * A.to(acc))  # [b,h,p,n]
    new_state = decay * state.to(acc) + (dtf * x.to(acc)).unsqueeze(-1) * Bh.unsqueeze(-2)
    state.copy_(new_state.to(state.dtype))
    y = (new_state * Ch.unsqueeze(-2)).sum(-1)
    if D is not None:
        y = y + x.to(acc) * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(x.dtype)
    return y if has_heads else y.squeeze(1)
