"""Recurrent generation against repeated full forwards, and batched left padding."""

import pytest
import torch

from mamba.model import MambaConfig, MambaLMHeadModel, sample_next


def tiny(pattern):
    return MambaLMHeadModel(MambaConfig(
        d_model=64, n_layer=len(pattern), vocab_size=101, layer_pattern=pattern,
        d_intermediate=96 if "-" in pattern else 0,
        ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8})).eval()


def argmax_decode(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids)[:, -1, :model.config.vocab_size].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("pattern", ["mm", "MM", "M*-m"])
@pytest.mark.parametrize("batch", [2, 6])  # 6: past the fused C block's few rows, the composed path
def test_greedy_generation_equals_argmax_of_full_forwards(pattern, batch):
    model = tiny(pattern)
    prompt = torch.randint(0, 101, (batch, 7))
    assert torch.equal(model.generate(prompt, 12), argmax_decode(model, prompt, 12))


def test_left_padded_batch_equals_one_by_one():
    model = tiny("M*-m")
    prompts = [torch.randint(1, 101, (n,)) for n in (9, 2, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = model.generate(ids, 10, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 10)
        assert torch.equal(batched[i, width:], alone[0, len(p):]), f"prompt {i}"


def test_eos_stops_and_streamer_sees_every_token():
    model = tiny("MM")
    prompt = torch.randint(0, 101, (1, 4))
    free = model.generate(prompt, 6)
    eos = int(free[0, 6])  # the third generated token
    seen = []
    out = model.generate(prompt, 6, eos_token_id=eos, streamer=lambda t: seen.append(int(t[0])))
    assert out[0, 4:].tolist() == free[0, 4:7].tolist() and seen == free[0, 4:7].tolist()


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, top_k=1, generator=g)) for _ in range(20)} == {1}
    # top_p=0.6: token 1 alone has p=0.66 -> only it survives
    assert {int(sample_next(logits, 1.0, top_p=0.6, generator=g)) for _ in range(20)} == {1}
    # top_k=2 keeps tokens 1 and 2 only
    assert {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)} == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny("MM")
    prompt = torch.randint(0, 101, (2, 3))
    a = model.generate(prompt, 8, temperature=0.8, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=0.8, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_generation_arguments():
    model = tiny("MM")
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 2,
                       attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(torch.ones(1, 0, dtype=torch.long), 2)
