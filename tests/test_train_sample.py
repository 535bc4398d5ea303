"""The main job's sample ends where the answer ends (newline or EOS), not in the next "Question:".

The model is a real MambaLMHeadModel made into a byte-level bigram table: the mixer's output
projection is zero, so the residual stream is the one-hot embedding of the current byte, and
lm_head maps each byte to its chosen successor. Greedy generation then follows a known chain.
"""

import re

import pytest
import torch

from data.tokenizer import load_tokenizer
from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.strict import ConfigError
from mamba.train import sample_stops, sample_text
from mamba.train_config import SampleSection, parse_config

QA_PROMPT = "Question: What is 7 plus 4?\nAnswer:"
EOS = 256


def bigram_model(successor: dict[str, str | int], default: str = "x") -> MambaLMHeadModel:
    config = MambaConfig(d_model=264, n_layer=1, vocab_size=258, layer_pattern="m", tie_embeddings=False,
                         ssm_cfg={"d_state": 4})
    model = MambaLMHeadModel(config).eval()
    with torch.no_grad():
        model.backbone.layers[0].mixer.out_proj.weight.zero_()
        model.backbone.embedding.weight.copy_(torch.eye(264))
        head = torch.zeros(264, 264)
        for i in range(258):
            head[ord(default), i] = 1.0
        for a, b in successor.items():
            head[:, ord(a)] = 0.0
            head[b if isinstance(b, int) else ord(b), ord(a)] = 1.0
        model.lm_head.weight.copy_(head)
    return model


# after the prompt's ':' the chain is " 7\nQ: 7\nQ: 7..." (the answer, then a new question)
CHAIN = {":": " ", " ": "7", "7": "\n", "\n": "Q", "Q": ":"}


def test_the_bigram_model_runs_on_past_the_answer_without_a_stop():
    tok = load_tokenizer("byte")
    text = sample_text(bigram_model(CHAIN), tok, SampleSection(QA_PROMPT, 12, stop=[]), EOS)
    assert text == " 7\nQ: 7\nQ: 7"  # what the main job printed before the fix


@pytest.mark.parametrize("prompt", [QA_PROMPT, "Question: Is 41 even?\nAnswer: "])
def test_a_qa_prompt_stops_at_the_end_of_the_answer(prompt):
    tok = load_tokenizer("byte")
    text = sample_text(bigram_model(CHAIN), tok, SampleSection(prompt, 40), EOS)
    assert text == (" 7" if prompt.endswith(":") else "7")


def test_eos_ends_the_sample_too():
    tok = load_tokenizer("byte")
    chain = {**CHAIN, "7": EOS}  # the answer ends with EOS, as after an instruct fine-tune
    text = sample_text(bigram_model(chain), tok, SampleSection(QA_PROMPT, 40, stop=[]), EOS)
    assert text == " 7"


def test_other_prompts_are_not_cut_unless_asked():
    tok = load_tokenizer("byte")
    model = bigram_model({"e": "\n", "\n": "e"})
    assert sample_text(model, tok, SampleSection("The", 5), EOS) == "\ne\ne\n"
    assert sample_text(model, tok, SampleSection("The", 5, stop=["e\n"]), EOS) == "\n"


def test_stop_rule():
    assert sample_stops(SampleSection(QA_PROMPT)) == ["\n"]
    assert sample_stops(SampleSection("Question: x?\nAnswer: ")) == ["\n"]
    assert sample_stops(SampleSection("The")) == []
    assert sample_stops(SampleSection(QA_PROMPT, stop=["###", ""])) == ["###"]


def test_sample_section_is_checked():
    base = {"model": {"vocab_size": 258, "d_model": 32, "n_layer": 1}, "max_duration": "1ba",
            "data": {"local": "x", "seq_len": 8, "global_batch_size": 1, "micro_batch_size": 1}}
    assert parse_config({**base, "sample": {"prompt": "Q", "stop": ["\n"]}}).sample.stop == ["\n"]
    for sample, message in [({"prompt": ""}, "sample.prompt=''"),
                            ({"max_new_tokens": 0}, "config.sample.max_new_tokens=0: must be >= 1"),
                            ({"temperature": -1}, "config.sample.temperature=-1.0: must be >= 0"),
                            ({"stop": "\n"}, "config.sample.stop='\\n': expected a list of str")]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            parse_config({**base, "sample": sample})
