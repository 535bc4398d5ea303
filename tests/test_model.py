"""The model against independent implementations (HF transformers) and against itself run
another way (recurrent decode vs full forward, packed rows vs separate documents)."""

import json
import math

import pytest
import torch
import transformers

from mamba.model import MambaConfig, MambaLMHeadModel, no_weight_decay_names

SMALL_SSM = {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8}


def tiny(pattern=None, **kw):
    base = dict(d_model=64, n_layer=len(pattern) if pattern else 2, vocab_size=101,
                layer_pattern=pattern, d_intermediate=96 if pattern and "-" in pattern else 0,
                ssm_cfg=dict(SMALL_SSM), attn_cfg={"num_heads": 4, "num_heads_kv": 2,
                                                   "rotary_emb_dim": 8})
    base.update(kw)
    return MambaLMHeadModel(MambaConfig(**base)).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def from_hf_names(state):
    return {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}


# ---------------------------------------------------------------- parity with transformers
def test_mamba1_matches_transformers_at_mamba_130m_shape():
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=768, state_size=16, num_hidden_layers=2, vocab_size=50280, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
        tie_word_embeddings=True)).eval()
    ours = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=2, vocab_size=50277)).eval()
    ours.load_state_dict(from_hf_names(hf.state_dict()), strict=True)
    ids = torch.randint(0, 50277, (2, 33))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_mamba2_matches_transformers_at_mamba2_130m_shape():
    # One layer at the 130m's widths: the shapes are what this checks, and transformers' reference
    # Mamba-2 (no kernels) spends ~8 s per layer here; two layers' residual stream is checked above.
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=768, num_heads=24, head_dim=64, n_groups=1, state_size=128, expand=2,
        chunk_size=256, num_hidden_layers=1, vocab_size=50288, tie_word_embeddings=True)).eval()
    ours = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=1, vocab_size=50277,
                                        ssm_cfg={"layer": "Mamba2"},
                                        pad_vocab_size_multiple=16)).eval()
    ours.load_state_dict(from_hf_names(hf.state_dict()), strict=True)
    # one row longer than one 256-token chunk (two rows took transformers 5x as long; rows are
    # independent, and the tiny-model tests compare batches of several rows)
    ids = torch.randint(0, 50277, (1, 300))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


# ---------------------------------------------------------------- decode == forward
@pytest.mark.parametrize("pattern", ["mm", "MM", "M*", "-M", "Mm*-M*"])
def test_prefill_then_steps_equal_full_forward(pattern):
    model = tiny(pattern)
    ids = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2, 40)
        outs = [model(ids[:, :9], inference_params=cache)]
        cache.seqlen_offset = 9
        for t in range(9, 23):
            outs.append(model(ids[:, t:t + 1], inference_params=cache))
            cache.seqlen_offset += 1
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


def test_state_spaces_hybrid_form_decodes_and_packs():
    model = tiny(None, n_layer=3, attn_layer_idx=[1], d_intermediate=80,
                 ssm_cfg={"layer": "Mamba2", **SMALL_SSM})
    assert [type(b.mixer).__name__ for b in model.backbone.layers] == ["Mamba2", "Attention", "Mamba2"]
    assert all(b.mlp is not None for b in model.backbone.layers)
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(1, 12)
        first = model(ids[:, :5], inference_params=cache)
        cache.seqlen_offset = 5
        rest = model(ids[:, 5:], inference_params=cache)  # continued token by token
    assert rel_err(torch.cat([first, rest], 1), full) < 1e-5


# ---------------------------------------------------------------- packed documents
def test_packed_row_equals_separate_documents_for_every_layer_type():
    model = tiny("Mm*-M*")
    lengths = [5, 11, 1, 7]
    ids = torch.randint(0, 101, (2, sum(lengths)))
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(2, -1)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)
        start, parts = 0, []
        for n in lengths:
            parts.append(model(ids[:, start:start + n]))
            start += n
    assert rel_err(packed, torch.cat(parts, 1)) < 1e-5
    with torch.no_grad():  # and without seq_idx the documents do see each other
        assert rel_err(model(ids), torch.cat(parts, 1)) > 1e-3


def test_packed_training_gradients_flow_through_all_layer_kinds():
    model = tiny("Mm*-M*").train()
    ids = torch.randint(0, 101, (2, 20))
    seq_idx = torch.tensor([[0] * 8 + [1] * 12] * 2)
    loss = torch.nn.functional.cross_entropy(model(ids, seq_idx=seq_idx)[:, :-1].reshape(-1, 104),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


# ---------------------------------------------------------------- shapes, init, names
def test_nvidia_8b_hybrid_pattern_builds_at_reduced_width():
    pattern = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    assert len(pattern) == 56
    cfg = MambaConfig(d_model=64, n_layer=56, vocab_size=256, layer_pattern=pattern,
                      d_intermediate=128, mlp_activation="gelu", tie_embeddings=False,
                      ssm_cfg={"ngroups": 8, "headdim": 16, "d_state": 16},
                      attn_cfg={"num_heads": 8, "num_heads_kv": 2, "qkv_proj_bias": False,
                                "out_proj_bias": False})
    model = MambaLMHeadModel(cfg)
    kinds = [type(b.mixer).__name__ for b in model.backbone.layers]
    assert kinds.count("Mamba2") == 24 and kinds.count("Attention") == 4 and kinds.count("MLP") == 28
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert model(torch.randint(0, 256, (1, 10))).shape == (1, 10, 256)


def test_parameter_names_are_state_spaces():
    names = set(tiny("Mm*-").state_dict())
    for expected in ["backbone.embedding.weight", "backbone.layers.0.norm.weight",
                     "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.conv1d.weight",
                     "backbone.layers.0.mixer.dt_bias", "backbone.layers.0.mixer.A_log",
                     "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.norm.weight",
                     "backbone.layers.0.mixer.out_proj.weight", "backbone.layers.1.mixer.x_proj.weight",
                     "backbone.layers.1.mixer.dt_proj.bias", "backbone.layers.2.mixer.in_proj.weight",
                     "backbone.layers.3.mixer.fc1.weight", "backbone.norm_f.weight", "lm_head.weight"]:
        assert expected in names


def test_initialisation_follows_state_spaces():
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=256, n_layer=4, vocab_size=1000,
                                         ssm_cfg={"layer": "Mamba2"}))
    mixer = model.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), then divided by sqrt(n_layer)
    bound = 1 / math.sqrt(mixer.out_proj.in_features) / math.sqrt(4)
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.9 * bound
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 2e-3
    nwd = no_weight_decay_names(model)
    assert "backbone.layers.0.mixer.A_log" in nwd and "backbone.layers.0.mixer.D" in nwd
    assert "backbone.layers.0.mixer.dt_bias" in nwd and "backbone.norm_f.weight" in nwd
    assert "backbone.layers.0.mixer.in_proj.weight" not in nwd
    m1 = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=1, vocab_size=10)).backbone.layers[0].mixer
    assert torch.allclose(torch.exp(m1.A_log[0]), torch.arange(1, 17, dtype=torch.float32))
    dt1 = torch.nn.functional.softplus(m1.dt_proj.bias)
    assert dt1.min() >= 1e-3 * 0.999 and dt1.max() <= 0.1 * 1.001


def test_vocab_is_padded_and_embeddings_tied():
    model = tiny(None, vocab_size=101, pad_vocab_size_multiple=8)
    assert model.backbone.embedding.weight.shape[0] == 104
    assert model.lm_head.weight is model.backbone.embedding.weight


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize("kwargs,message", [
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 48}), r"ssm_cfg.headdim=48: must divide d_inner"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 16, "ngroups": 3}), r"ssm_cfg.ngroups=3: must divide"),
    (dict(layer_pattern="MxM", n_layer=3), r"unknown symbol\(s\) \['x'\]"),
    (dict(layer_pattern="MM", n_layer=3), r"n_layer=3: must equal len\(layer_pattern\)=2"),
    (dict(layer_pattern="M-", n_layer=2), r"d_intermediate=0: must be > 0"),
    (dict(attn_layer_idx=[0], attn_cfg={"num_heads": 4, "num_heads_kv": 3}), r"num_heads_kv=3"),
    (dict(attn_layer_idx=[5]), r"attn_layer_idx=\[5\]: indices \[5\] are outside"),
    (dict(ssm_cfg={"layer": "Mamba3"}), r"ssm_cfg.layer='Mamba3'"),
    (dict(ssm_cfg={"d_sate": 16}), r"unknown key\(s\) \['d_sate'\]"),
    (dict(mlp_activation="tanh"), r"mlp_activation='tanh'"),
])
def test_bad_configs_raise_value_error_naming_the_field(kwargs, message):
    base = dict(d_model=64, n_layer=2, vocab_size=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MambaConfig(**base)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_round_trip(tmp_path, safe, tied):
    model = tiny("Mm*-", tie_embeddings=tied)
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=safe)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tied
    # saving again in the other format leaves exactly one weight file behind
    loaded.save_pretrained(tmp_path / "ckpt", safe_serialization=not safe)
    assert len([p for p in (tmp_path / "ckpt").iterdir() if p.name != "config.json"]) == 1


def test_loads_a_state_spaces_folder(tmp_path):
    """config.json with exactly state-spaces' keys + pytorch_model.bin holding lm_head too."""
    cfg = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    source = MambaLMHeadModel(MambaConfig(**cfg))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(source(ids), loaded(ids))


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    model = tiny("MM")
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["d_model"] = 32
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    wrong = r"wrong shape: backbone.embedding.weight: expected \(104, 32\), found \(104, 64\)"
    with pytest.raises(ValueError, match=wrong):
        MambaLMHeadModel.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(tiny("MM").config.to_dict()))
    (tmp_path / "b" / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.safetensors: not a readable checkpoint"):
        MambaLMHeadModel.from_pretrained(tmp_path / "b")
    cfg["d_modle"] = 1
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown MambaConfig field\(s\) \['d_modle'\]"):
        MambaLMHeadModel.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("order", ["children_first", "parents_first"])
def test_meta_device_init_initialises_every_parameter(order):
    """FSDP materialises meta modules one by one and calls param_init_fn on each (Composer's
    FSDP2 children first, FSDP1 parents first): every parameter must come out initialised."""
    cfg = MambaConfig(d_model=64, n_layer=5, vocab_size=101, layer_pattern="Mm*-M", d_intermediate=96,
                      ssm_cfg=dict(SMALL_SSM), attn_cfg={"num_heads": 4})
    with torch.device("meta"):
        model = MambaLMHeadModel(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    modules = list(model.modules())
    for module in (reversed(modules) if order == "children_first" else modules):
        model.init_module(module)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    m1 = model.backbone.layers[1].mixer
    assert torch.allclose(torch.exp(m1.A_log[3]), torch.arange(1, 17, dtype=torch.float32))
    dt = torch.nn.functional.softplus(m1.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    m2 = model.backbone.layers[0].mixer
    assert torch.equal(m2.norm.weight, torch.ones_like(m2.norm.weight))
    assert torch.equal(model.backbone.norm_f.weight, torch.ones_like(model.backbone.norm_f.weight))
    bound = 1 / math.sqrt(m2.out_proj.in_features) / math.sqrt(5)
    assert m2.out_proj.weight.abs().max() <= bound
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 3e-3
    assert torch.isfinite(model(torch.randint(0, 101, (1, 8)))).all()


# ---------------------------------------------------------------- training memory (issue 14.6)
def test_block_gradients_are_exact_with_the_memory_saving_norms():
    """RMSNorm's own backward and the recomputed gated norm against numerical gradients."""
    from mamba.model.lm import _RMSNormFunction

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    for across in (False, True):
        model = tiny("M", ssm_cfg={**SMALL_SSM, "norm_across_channels": across}).double().train()
        block = model.backbone.layers[0]
        with torch.no_grad():
            block.mixer.norm.weight.add_(torch.randn(block.mixer.d_inner, dtype=torch.float64))
        hidden = torch.randn(1, 9, 64, dtype=torch.float64, requires_grad=True) * 0.5
        norm_w = block.mixer.norm.weight

        def run(h, gated_weight):
            with torch.nn.utils.stateless._reparametrize_module(block, {"mixer.norm.weight": gated_weight}):
                out, residual = block(h, None)
            return out.sum(-1) + residual.sum(-1)

        # the gated norm computes in float32 even here: a wide finite-difference step, loose tolerance
        inputs = (hidden.detach().requires_grad_(), norm_w.detach().requires_grad_())
        assert torch.autograd.gradcheck(run, inputs, eps=1e-3, atol=2e-3, rtol=1e-2, fast_mode=True)


def test_a_mamba2_block_keeps_no_activation_twice():
    """What autograd keeps for a Mamba-2 block: RMSNorm keeps its input and 1/rms only, and the
    gated norm's intermediates and in_proj's output ([z|xBC|dt], held through z's view) are gone."""
    model = tiny("M").train()
    block = model.backbone.layers[0]
    tokens, d_inner = 32, block.mixer.d_inner
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    hidden = torch.randn(1, tokens, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = block(hidden, None)
    in_proj_out = tokens * block.mixer.in_proj.out_features * 4
    assert all(nbytes != in_proj_out for _, nbytes, _ in saved)
    storages = {ptr: nbytes for ptr, nbytes, _ in saved}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    gated = [s for ptr, s in storages.items() if ptr not in params and s == tokens * d_inner * 4]
    assert len(gated) <= 4, gated  # y, z, the gated norm's output (out_proj's input), and x*dt in the scan
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block.norm(hidden)
    assert sorted(math.prod(shape) for _, _, shape in saved) == sorted([64, tokens, tokens * 64])
