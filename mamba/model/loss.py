"""Cross entropy of the LM head without materialising [tokens, vocab] logits.

A training step's logits are the largest single tensor of a small model: 2,048 tokens x 50,288
classes is 412 MB in fp32, and the plain `F.cross_entropy(lm_head(h))` holds it several times
(the logits, log-softmax saved for backward, its gradient, the gradient of the vocab slice).
Here the tokens go through the head in chunks of about CHUNK_BYTES of logits; each chunk's
softmax gradient is turned into the gradients of the hidden states and of the head weight right
away (the loss is a scalar, so backward only rescales them). Peak extra memory: one chunk of
logits, plus the head-weight gradient that backward would allocate anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # fp32 logits per chunk


@dataclass
class LMLoss:
    """What a training forward returns: the loss and the counts the train metrics need."""

    loss: torch.Tensor  # mean over labelled tokens (0 when there are none); differentiable
    loss_sum: torch.Tensor  # sum over labelled tokens, detached, fp32 (fp64 for fp64 inputs)
    n_tokens: torch.Tensor  # labelled tokens (int64)
    n_correct: torch.Tensor  # labelled tokens whose argmax is the label (int64)


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, vocab_size: int | None = None,
                         chunk_bytes: int = CHUNK_BYTES) -> LMLoss:
    """Mean cross entropy of logits = hidden @ weight[:vocab_size].T (+ bias) against labels,
    over the positions whose label is not -100, as `F.cross_entropy(..., ignore_index=-100)`.

    hidden [..., d], labels [...] (same leading shape), weight [V, d] with V >= vocab_size;
    rows of weight past vocab_size (vocabulary padding) are not classes and get zero gradient.
    """
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{weight.shape[0]} (the head's rows)")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    flat_labels = labels.reshape(-1)
    labelled = flat_labels != IGNORE_INDEX
    if labelled.any():
        lo, hi = flat_labels[labelled].min().item(), flat_labels[labelled].max().item()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"label {lo if lo < 0 else hi} is outside 0..{vocab - 1} (and is not "
                             f"the ignore index {IGNORE_INDEX})")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (hidden, weight, bias))
    loss, loss_sum, n_tokens, n_correct = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_labels, vocab,
        chunk_rows(vocab, chunk_bytes), grads)
    return LMLoss(loss, loss_sum, n_tokens, n_correct)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab, rows, grads):
        cd = _compute_dtype(hidden, weight)
        acc = torch.promote_types(cd, torch.float32)  # softmax in fp32 at least
        h, w = hidden.to(cd), weight[:vocab].to(cd)
        # fp16's range cannot hold (softmax - onehot) / n_tokens before the loss scale multiplies it
        # in backward (values ~1e-9 flush to 0): gradients are formed and kept in fp32 there, and
        # cast to their tensors' dtypes only after the scale (bf16 has fp32's range).
        gd = torch.float32 if cd == torch.float16 else cd
        w_g = w if gd == cd else w.to(gd)
        b = None if bias is None else bias[:vocab].to(acc)
        labelled = labels != IGNORE_INDEX
        n_tokens = labelled.sum()
        scale = 1.0 / max(int(n_tokens), 1)
        want_h = grads and hidden.requires_grad
        want_w = grads and weight.requires_grad
        want_b = grads and bias is not None and bias.requires_grad
        grad_h = torch.empty(hidden.shape, dtype=torch.promote_types(hidden.dtype, gd),
                             device=hidden.device) if want_h else None
        # summed over chunks: in fp32 at least, cast to the weight's dtype at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc),
                             device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, acc),
                             device=bias.device) if want_b else None
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        n_correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], rows):
                end = min(start + rows, h.shape[0])
                h_c, y_c, m_c = h[start:end], labels[start:end], labelled[start:end]
                target = y_c.clamp(min=0).unsqueeze(1)
                logits = torch.mm(h_c, w.t()).to(acc)  # [n, vocab]: the only logits there are
                if b is not None:
                    logits += b
                n_correct += ((logits.argmax(-1) == y_c) & m_c).sum()
                picked = logits.gather(1, target).squeeze(1)
                top = logits.amax(-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # in place: logits become softmax numerators
                total = probs.sum(-1, keepdim=True)
                lse = top.squeeze(1) + total.squeeze(1).log()
                loss_sum += ((lse - picked) * m_c).sum()
                if not (want_h or want_w or want_b):
                    continue
                probs.div_(total)  # d(mean loss)/d(logits) = (softmax - onehot) / n_tokens
                probs.scatter_add_(1, target, torch.full_like(picked, -1.0).unsqueeze(1))
                probs.mul_((m_c.to(acc) * scale).unsqueeze(1))
                if want_h:
                    grad_h[start:end] = torch.mm(probs.to(gd), w_g)
                if want_w:
                    if grad_w.dtype == gd:
                        grad_w[:vocab].addmm_(probs.t().to(gd), h_c.to(gd))
                    else:
                        grad_w[:vocab] += torch.mm(probs.t().to(gd), h_c.to(gd))
                if want_b:
                    grad_b[:vocab] += probs.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = loss_sum * scale
        ctx.mark_non_differentiable(loss_sum, n_tokens, n_correct)
        return loss, loss_sum, n_tokens, n_correct

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward twice through the same loss is not "
                               "supported (its gradients are computed once, in forward)")
        if torch.is_grad_enabled():  # only under create_graph=True
            raise RuntimeError("linear_cross_entropy: create_graph / higher-order gradients are not "
                               "supported (its gradients are computed in forward)")
        grads, ctx.grads = ctx.grads, None
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype)
                                  for g, dtype in zip(grads, ctx.dtypes, strict=True))
        return grad_h, grad_w, grad_b, None, None, None, None
