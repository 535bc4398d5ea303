"""The chunked LM-head cross entropy (mamba.model.loss) against F.cross_entropy, and its memory."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mamba.composer_model import ComposerMamba
from mamba.model import MambaConfig
from mamba.model.loss import linear_cross_entropy


def inputs(shape=(2, 37), d=16, padded=53, vocab=50, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(padded, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(padded, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, vocab):
    logits = hidden @ weight[:vocab].t() + (0 if bias is None else bias[:vocab])
    return F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_rows,bias", [(7, True), (1, False), (1000, True)])
def test_loss_and_gradients_equal_cross_entropy(chunk_rows, bias):
    hidden, weight, b, labels = inputs(bias=bias)
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50,
                                chunk_bytes=chunk_rows * 4 * 50)
    ref = reference(hidden, weight, b, labels, 50)
    torch.testing.assert_close(ours.loss, ref, rtol=1e-12, atol=1e-12)
    scale = 0.37  # Composer scales each microbatch's loss before backward
    for g_ours, g_ref in zip(grads(ours.loss * scale, (hidden, weight, b)),
                             grads(ref * scale, (hidden, weight, b)), strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(grads(linear_cross_entropy(hidden, weight, labels, bias=b,
                                                          vocab_size=50).loss, (weight,))[0][50:]) == 0


def test_counts_for_the_train_metrics():
    hidden, weight, b, labels = inputs()
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50, chunk_bytes=800)
    logits = hidden @ weight[:50].t() + b[:50]
    mask = labels != -100
    assert ours.n_tokens.item() == mask.sum().item()
    assert ours.n_correct.item() == ((logits.argmax(-1) == labels) & mask).sum().item()
    total = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(ours.loss_sum, total.detach())
    assert not ours.loss_sum.requires_grad


def test_no_labelled_tokens_gives_zero_loss_and_zero_gradients_not_nan():
    hidden, weight, b, labels = inputs()
    labels[:] = -100
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50)
    assert ours.loss.item() == 0.0 and ours.n_tokens.item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(ours.loss, (hidden, weight, b)))


def test_bf16_autocast_is_close_to_fp32():
    hidden, weight, b, labels = inputs(dtype=torch.float32)
    ref = reference(hidden, weight, b, labels, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50, chunk_bytes=800)
    gh, gw, _ = grads(ours.loss, (hidden, weight, b))
    rh, rw, _ = grads(ref, (hidden, weight, b))
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert abs(ours.loss.item() - ref.item()) < 0.05 * ref.item()
    assert (gw - rw).norm() < 0.05 * rw.norm() and (gh - rh).norm() < 0.05 * rh.norm()


def test_fp16_gradients_survive_until_the_loss_scale():
    """amp_fp16: (softmax - onehot) / n_tokens is ~1e-9 here, below fp16's range; the gradient must not
    flush to 0 before backward multiplies it by the loss scale (as F.cross_entropy's does not)."""
    hidden, weight, _, labels = inputs(shape=(1, 8192), d=8, padded=8192, vocab=8192, bias=False,
                                       dtype=torch.float32)
    scale = 65536.0
    with torch.autocast("cpu", dtype=torch.float16):
        ours = linear_cross_entropy(hidden, weight, labels, vocab_size=8192)
    gh, gw = torch.autograd.grad(ours.loss * scale, (hidden, weight))
    ref = reference(hidden, weight, None, labels, 8192) * scale
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert (gw - rw).norm() < 0.01 * rw.norm() and (gh - rh).norm() < 0.01 * rh.norm()
    assert (gw == 0).float().mean() < 1e-3  # nothing flushed to zero


def test_create_graph_is_a_clear_error():
    hidden, weight, b, labels = inputs()
    out = linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)


def test_bad_labels_and_a_second_backward_are_clear_errors():
    hidden, weight, b, labels = inputs()
    labels[0, 0] = 50  # a padding row of the head is not a class
    with pytest.raises(ValueError, match="label 50 is outside 0..49"):
        linear_cross_entropy(hidden, weight, labels, bias=b, vocab_size=50)
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(hidden, weight, labels[:, 1:], vocab_size=50)
    labels[0, 0] = 1
    loss = linear_cross_entropy(hidden, weight, labels, vocab_size=50).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def peak_allocated(fn) -> int:
    """Peak bytes allocated by torch on the CPU while fn runs (the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def test_forward_and_backward_never_hold_the_logits():
    tokens, vocab = 1024, 4096
    hidden, weight, b, labels = inputs(shape=(1, tokens), d=32, padded=vocab, vocab=vocab,
                                       bias=False, dtype=torch.float32)
    logits_bytes = tokens * vocab * 4
    plain = peak_allocated(lambda: reference(hidden, weight, None, labels, vocab).backward())
    assert plain > 2 * logits_bytes  # the measurement sees the plain path's copies
    ours = peak_allocated(lambda: linear_cross_entropy(hidden, weight, labels, vocab_size=vocab,
                                                       chunk_bytes=logits_bytes // 8).loss.backward())
    assert ours < 0.5 * logits_bytes


def test_training_step_saves_no_logits_and_matches_the_logits_loss():
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=500, layer_pattern="M*",
                         ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 8}, attn_cfg={"num_heads": 2})
    torch.manual_seed(0)
    model = ComposerMamba(config)
    ids = torch.randint(0, 500, (2, 40))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels}
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    assert max(biggest) < ids.numel() * config.vocab_size  # nothing logits-sized kept for backward
    model.loss(out, batch).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.eval()
    ref = model.loss(model(batch), batch)  # logits path: F.cross_entropy over the real vocabulary
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
