"""Recurrent generation: prefill the prompt once, then one token per step from the cache."""

from __future__ import annotations

import torch

from kernels import decoding_threads


def sample_next(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None):
    """logits [b,V] -> token ids [b]. temperature 0 means greedy (argmax)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0 (got {temperature}), 0 < top_p <= 1 (got "
                         f"{top_p}), top_k >= 0 (got {top_k})")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | None = None, attention_mask=None,
             generator: torch.Generator | None = None, streamer=None):
    """Return [b, prompt + generated] token ids.

    attention_mask [b, prompt] (1 = real token) supports left-padded batches: padded positions
    are skipped by the recurrent state (their input is zeroed and the state reset) and hidden
    from attention. Finished rows (after eos) keep emitting eos. `streamer(tokens [b])` is called
    after every step.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    cache = model.allocate_inference_cache(batch, prompt_len + max_new_tokens)
    seq_idx = None
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.bool)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: pad on the left (the last prompt position must be real)")
        key_mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.bool,
                              device=input_ids.device)
        key_mask[:, :prompt_len] = attention_mask
        cache.key_mask = key_mask
        # Padding forms its own "document" (seq_idx 0) so no state flows from it into the prompt.
        seq_idx = attention_mask.to(torch.int32)
    logits = model(input_ids, seq_idx=seq_idx, inference_params=cache, num_last_tokens=1)[:, -1]
    cache.seqlen_offset = prompt_len
    out = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    vocab = model.config.vocab_size
    with decoding_threads(batch, input_ids.device):
        for _ in range(max_new_tokens):
            token = sample_next(logits[:, :vocab], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            out.append(token[:, None])
            if streamer is not None:
                streamer(token)
            if eos_token_id is not None and bool(finished.all()):
                break
            logits = model(token[:, None], inference_params=cache)[:, -1]
            cache.seqlen_offset += 1
    return torch.cat(out, dim=1)
