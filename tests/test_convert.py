"""mamba.convert: every source layout, written from a random model at published shapes, converts
to a model with the same logits; exports load in transformers; round trips are lossless."""

import argparse
import datetime
import json

import numpy as np
import pytest
import torch
import transformers

from mamba.convert import convert, main
from mamba.interop.tensors import ConvertError
from mamba.model import MambaConfig, MambaLMHeadModel

SMALL_SSM = {"d_state": 16, "headdim": 16, "chunk_size": 8}
NVIDIA_PATTERN = "M-M*-M"  # every layer kind of the 8B hybrid, reduced


def logits(model, vocab, length=64, seed=1):
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def load(folder):
    return MambaLMHeadModel.from_pretrained(folder).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def randomise(model):
    """Non-trivial values everywhere (norm weights are ones at init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def nvidia_hybrid(pattern=NVIDIA_PATTERN):
    """A reduced NVIDIA Mamba2-Hybrid: ngroups 8, GQA (8 heads, 2 KV groups), no biases, no RoPE,
    GELU MLP layers, untied output layer."""
    cfg = MambaConfig(d_model=64, n_layer=len(pattern), vocab_size=256, pad_vocab_size_multiple=1,
                      layer_pattern=pattern, d_intermediate=96, mlp_activation="gelu",
                      tie_embeddings=False, ssm_cfg={**SMALL_SSM, "ngroups": 8},
                      attn_cfg={"num_heads": 8, "num_heads_kv": 2, "qkv_proj_bias": False,
                                "out_proj_bias": False})
    return randomise(MambaLMHeadModel(cfg))


# ---------------------------------------------------------------- state-spaces
STATE_SPACES_KEYS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                     "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                     "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")


def write_state_spaces_folder(folder, cfg: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    model = randomise(MambaLMHeadModel(MambaConfig(**cfg)))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # lm_head included, as theirs
    (folder / "tokenizer.json").write_text("{}")
    return model


@pytest.mark.parametrize("name,cfg", [
    ("mamba-130m", dict(d_model=768, n_layer=2, vocab_size=50277, ssm_cfg={})),
    ("mamba2-130m", dict(d_model=768, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=16,
                         ssm_cfg={"layer": "Mamba2"})),
    ("mamba2-hybrid", dict(d_model=64, n_layer=3, vocab_size=101, d_intermediate=80,
                           attn_layer_idx=[1], ssm_cfg={"layer": "Mamba2", **SMALL_SSM},
                           attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8})),
])
def test_state_spaces_folder_converts_with_same_logits(tmp_path, name, cfg):
    full = dict(d_intermediate=0, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                tie_embeddings=True)
    full.update(cfg)
    source = write_state_spaces_folder(tmp_path / "src", full)
    convert("state-spaces", tmp_path / "src", "native", tmp_path / "out")
    ours = load(tmp_path / "out")
    assert ours.backbone.embedding.weight.shape[0] == source.config.padded_vocab_size
    assert torch.equal(logits(ours, cfg["vocab_size"]), logits(source, cfg["vocab_size"]))
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_state_spaces_export_is_what_mamba_ssm_reads_and_round_trips(tmp_path):
    model = randomise(MambaLMHeadModel(MambaConfig(
        d_model=64, n_layer=4, vocab_size=101, layer_pattern="MM*M",
        ssm_cfg=SMALL_SSM, attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8})))
    model.save_pretrained(tmp_path / "ours")
    convert("native", tmp_path / "ours", "state-spaces", tmp_path / "ss")
    cfg = json.loads((tmp_path / "ss" / "config.json").read_text())
    assert tuple(cfg) == STATE_SPACES_KEYS  # nothing mamba_ssm's MambaConfig(**cfg) would reject
    assert cfg["attn_layer_idx"] == [2] and cfg["ssm_cfg"]["layer"] == "Mamba2"
    state = torch.load(tmp_path / "ss" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in state
    convert("state-spaces", tmp_path / "ss", "native", tmp_path / "back")
    assert_same_weights(load(tmp_path / "back"), model)


# ---------------------------------------------------------------- Hugging Face
def hf_mamba1():
    return transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=768, state_size=16, num_hidden_layers=2, vocab_size=50280, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True)).eval()


def hf_mamba2():
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=768, num_heads=24, head_dim=64, n_groups=1, state_size=128, expand=2,
        chunk_size=32, num_hidden_layers=2, vocab_size=50288, tie_word_embeddings=False)).eval()
    # chunk_size only sets compute blocks (transformers' CPU path pads to one); shapes are 130m's


@pytest.mark.parametrize("make_hf,safe", [(hf_mamba1, True), (hf_mamba1, False), (hf_mamba2, True)])
def test_hf_folder_converts_with_transformers_logits(tmp_path, make_hf, safe):
    hf = make_hf()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    convert("hf", tmp_path / "hf", "native", tmp_path / "out")
    ours = load(tmp_path / "out")
    assert rel_err(logits(ours, 50277), logits(hf, 50277)) <= 1e-4


@pytest.mark.parametrize("cfg,hf_class", [
    (dict(d_model=768, n_layer=2, vocab_size=50277), transformers.MambaForCausalLM),
    (dict(d_model=768, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=16,
          ssm_cfg={"layer": "Mamba2", "chunk_size": 32}), transformers.Mamba2ForCausalLM),
])
def test_hf_export_loads_in_transformers_and_round_trips(tmp_path, cfg, hf_class):
    model = randomise(MambaLMHeadModel(MambaConfig(**cfg)))
    model.save_pretrained(tmp_path / "ours")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    convert("native", tmp_path / "ours", "hf", tmp_path / "hf", tokenizer=tmp_path / "tok")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = hf_class.from_pretrained(tmp_path / "hf").eval()
    assert rel_err(logits(hf, 50277), logits(model, 50277)) <= 1e-4
    del hf
    convert("hf", tmp_path / "hf", "native", tmp_path / "back")
    back = load(tmp_path / "back")
    assert back.config == model.config
    assert_same_weights(back, model)


def test_hf_config_fields_left_out_take_transformers_defaults(tmp_path):
    """transformers' Mamba2Config defaults n_groups to 8 and tie_word_embeddings to False."""
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=64, num_heads=8, head_dim=16, n_groups=8, state_size=16, num_hidden_layers=1,
        vocab_size=96, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    values = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("n_groups", "tie_word_embeddings", "chunk_size", "expand"):
        del values[key]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(values))
    convert("hf", tmp_path / "hf", "native", tmp_path / "out")
    ours = load(tmp_path / "out")
    assert ours.config.ssm_options("M")["ngroups"] == 8 and not ours.config.tie_embeddings
    hf_state = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, hf_state[k.replace("backbone.embedding.", "backbone.embeddings.")]), k


def test_hybrid_to_hf_says_so_and_writes_state_spaces_form(tmp_path, capsys):
    nvidia_hybrid().save_pretrained(tmp_path / "ours")
    assert main(["--from", "native", str(tmp_path / "ours"), "--to", "hf", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "transformers has no class" in err and "state-spaces form" in err
    assert (tmp_path / "hf" / "pytorch_model.bin").is_file()
    assert_same_weights(load(tmp_path / "hf"), load(tmp_path / "ours"))


# ---------------------------------------------------------------- Megatron
def to_megatron(model, dialect="release"):
    """Our model -> one Megatron tensor-parallel rank's `model` state dict (TP=1)."""
    cfg, s = model.config, model.state_dict()
    out = {"embedding.word_embeddings.weight": s["backbone.embedding.weight"],
           "decoder.final_norm.weight": s["backbone.norm_f.weight"],
           "output_layer.weight": s["lm_head.weight"]}
    attn = cfg.attn_options()
    for i, kind in enumerate(cfg.layer_kinds()):
        p, ours = f"decoder.layers.{i}.", f"backbone.layers.{i}."
        norm = s[ours + "norm.weight"]
        if kind == "M":
            for leaf in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias",
                         "norm.weight", "out_proj.weight"):
                out[p + "mixer." + leaf] = s[ours + "mixer." + leaf]
            out[p + ("norm.weight" if dialect == "release" else "mixer.in_proj.layer_norm_weight")] = norm
            out[p + "mixer.in_proj._extra_state"] = None
        elif kind == "*":
            h, kv, hd = attn["num_heads"], attn["num_heads_kv"], attn["head_dim"]
            q, k, v = s[ours + "mixer.in_proj.weight"].split([h * hd, kv * hd, kv * hd])
            grouped = torch.cat([q.reshape(kv, h // kv, hd, -1), k.reshape(kv, 1, hd, -1),
                                 v.reshape(kv, 1, hd, -1)], dim=1)
            out[p + "self_attention.linear_qkv.weight"] = grouped.reshape(-1, cfg.d_model)
            out[p + "self_attention.linear_qkv.layer_norm_weight"] = norm
            out[p + "self_attention.linear_proj.weight"] = s[ours + "mixer.out_proj.weight"]
            out[p + "self_attention.core_attention._extra_state"] = torch.empty(0, dtype=torch.uint8)
        else:
            out[p + "mlp.linear_fc1.weight"] = s[ours + "mixer.fc1.weight"]
            out[p + "mlp.linear_fc1.layer_norm_weight"] = norm
            out[p + "mlp.linear_fc2.weight"] = s[ours + "mixer.fc2.weight"]
    return out


def split_tp(state, cfg, tp):
    """A TP=1 Megatron state dict -> `tp` ranks, sharded as Megatron shards them."""
    ssm = cfg.ssm_options("M")
    d_inner, bc = ssm["expand"] * cfg.d_model, ssm["ngroups"] * ssm["d_state"]
    comps = {"in_proj.weight": [d_inner, d_inner, bc, bc, d_inner // ssm["headdim"]],
             "conv1d.weight": [d_inner, bc, bc], "conv1d.bias": [d_inner, bc, bc]}
    ranks = [{} for _ in range(tp)]
    for key, t in state.items():
        leaf = key.split("mixer.")[-1]
        if t is None or "norm.weight" in key and "mixer.norm" not in key or "layer_norm" in key \
                or t.numel() == 0:
            shards = [t] * tp
        elif "mixer." in key and leaf in comps:
            parts = [c.chunk(tp) for c in t.split(comps[leaf])]
            shards = [torch.cat([c[r] for c in parts]) for r in range(tp)]
        elif key.endswith(("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")):
            shards = t.chunk(tp, dim=1)
        else:
            shards = t.chunk(tp, dim=0)
        for r in range(tp):
            ranks[r][key] = shards[r].clone() if isinstance(shards[r], torch.Tensor) else shards[r]
    return ranks


def megatron_args(cfg, **over):
    ssm, attn = cfg.ssm_options("M"), cfg.attn_options()
    values = dict(hidden_size=cfg.d_model, num_layers=cfg.n_layer,
                  num_attention_heads=attn["num_heads"], group_query_attention=True,
                  num_query_groups=attn["num_heads_kv"], kv_channels=attn["head_dim"],
                  mamba_state_dim=ssm["d_state"], mamba_head_dim=ssm["headdim"],
                  mamba_num_groups=ssm["ngroups"], hybrid_override_pattern=cfg.layer_pattern,
                  ffn_hidden_size=cfg.d_intermediate, padded_vocab_size=cfg.padded_vocab_size,
                  normalization="RMSNorm", norm_epsilon=1e-5, position_embedding_type="none",
                  squared_relu=False, params_dtype=torch.bfloat16, untie_embeddings_and_output_weights=True)
    values.update(over)
    return argparse.Namespace(**values)


def write_megatron(root, model, tp=1, dialect="release", args=True, **over):
    state = to_megatron(model, dialect)
    np_state = np.random.RandomState(0).get_state()
    for r, rank in enumerate(split_tp(state, model.config, tp)):
        folder = root / "release" / f"mp_rank_{r:02d}"
        folder.mkdir(parents=True)
        blob = {"model": rank, "checkpoint_version": 3.0, "iteration": 0,
                "args": megatron_args(model.config, **over) if args else None,
                "rng_state": [{"random_rng_state": (3, tuple(range(5)), None),
                               "np_rng_state": np_state, "torch_rng_state": torch.get_rng_state(),
                               "loss_scale": np.float64(1.0), "counts": np.arange(3)}]}
        torch.save(blob, folder / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    return root


@pytest.mark.parametrize("dialect", ["release", "nemo"])
def test_megatron_hybrid_converts_with_same_logits(tmp_path, dialect):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model, dialect=dialect)
    convert("megatron", tmp_path / "meg", "native", tmp_path / "out")
    ours = load(tmp_path / "out")
    assert ours.config.layer_pattern == NVIDIA_PATTERN
    assert ours.config.ssm_options("M")["ngroups"] == 8
    assert ours.config.attn_options()["num_heads_kv"] == 2
    assert_same_weights(ours, model)
    assert torch.equal(logits(ours, 256), logits(model, 256))


def test_megatron_tp2_merges_to_the_tp1_model(tmp_path):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "tp1", model, tp=1)
    write_megatron(tmp_path / "tp2", model, tp=2)
    assert not torch.equal(  # per-component sharding really differs from plain concatenation
        torch.load(tmp_path / "tp2/release/mp_rank_00/model_optim_rng.pt", weights_only=False)
        ["model"]["decoder.layers.0.mixer.in_proj.weight"],
        to_megatron(model)["decoder.layers.0.mixer.in_proj.weight"][:model.config.d_model * 2 + 72])
    convert("megatron", tmp_path / "tp1", "native", tmp_path / "a")
    convert("megatron", tmp_path / "tp2" / "release" / "mp_rank_00" / "model_optim_rng.pt", "native",
            tmp_path / "b")
    assert_same_weights(load(tmp_path / "a"), load(tmp_path / "b"))
    assert_same_weights(load(tmp_path / "b"), model)


def test_megatron_without_args_takes_ngroups_and_heads_from_flags(tmp_path):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model, tp=2, args=False)
    with pytest.raises(ConvertError, match="pass --num-heads"):
        convert("megatron", tmp_path / "meg", "native", tmp_path / "x", ngroups=8)
    assert not (tmp_path / "x").exists()
    assert main(["--from", "megatron", str(tmp_path / "meg"), "--to", "native", str(tmp_path / "out"),
                 "--ngroups", "8", "--num-heads", "8", "--num-kv-heads", "2"]) == 0
    assert_same_weights(load(tmp_path / "out"), model)


def test_pure_mamba2_megatron_with_squared_relu_flag_absent(tmp_path):
    model = randomise(MambaLMHeadModel(MambaConfig(
        d_model=64, n_layer=2, vocab_size=128, pad_vocab_size_multiple=1, layer_pattern="MM",
        tie_embeddings=False, ssm_cfg={**SMALL_SSM, "ngroups": 2})))
    write_megatron(tmp_path / "meg", model, tp=2, hybrid_override_pattern=None,
                   num_attention_heads=None)
    convert("megatron", tmp_path / "meg", "native", tmp_path / "out")
    assert torch.equal(logits(load(tmp_path / "out"), 128), logits(model, 128))


# ---------------------------------------------------------------- split projection, Composer
def test_split_projection_folder_rejoins_in_proj(tmp_path):
    model = randomise(MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=101,
                                                   layer_pattern="MM", ssm_cfg=SMALL_SSM)))
    model.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    mixer = model.backbone.layers[0].mixer
    sizes = [mixer.d_inner, mixer.conv_dim, mixer.nheads]
    for i in range(2):
        key = f"backbone.layers.{i}.mixer.in_proj.weight"
        parts = state.pop(key).split(sizes)
        for name, part in zip(("in_proj_z", "in_proj_xBC", "in_proj_dt"), parts, strict=True):
            state[key.replace("in_proj", name)] = part.contiguous()
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    convert("split", tmp_path / "ours", "native", tmp_path / "out")
    assert_same_weights(load(tmp_path / "out"), model)


def test_composer_checkpoint_converts(tmp_path):
    """The objects a real Composer 0.32 checkpoint pickles: numpy rng, timedelta, TorchVersion."""
    model = randomise(MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=101,
                                                   layer_pattern="Mm", ssm_cfg=SMALL_SSM)))
    model.save_pretrained(tmp_path / "cfg")
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()},
             "optimizers": {"DecoupledAdamW": {"state": {}, "param_groups": []}},
             "timestamp": {"epoch": 0, "batch": 6, "total_wct": datetime.timedelta(seconds=3)},
             "run_name": "t", "metadata": {"torch_version": torch.__version__}}
    blob = {"state": state, "rng": [{"python": (3, tuple(range(5)), None),
                                     "numpy": np.random.RandomState(0).get_state(),
                                     "torch": torch.get_rng_state()}]}
    torch.save(blob, tmp_path / "ep0-ba6-rank0.pt")
    with pytest.raises(ConvertError, match="pass --config"):
        convert("composer", tmp_path / "ep0-ba6-rank0.pt", "native", tmp_path / "x")
    convert("composer", tmp_path / "ep0-ba6-rank0.pt", "hf", tmp_path / "out",
            config=tmp_path / "cfg")
    assert_same_weights(load(tmp_path / "out"), model)  # mixed Mamba kinds: state-spaces form


def test_sharded_composer_checkpoint_converts(tmp_path):
    """The layout Composer's sharded save writes: a torch.distributed.checkpoint folder whose
    flattened keys are state.model.model.<native name>, beside non-tensor state."""
    import torch.distributed.checkpoint as dcp

    model = randomise(MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=101,
                                                   layer_pattern="M*", ssm_cfg=SMALL_SSM)))
    model.save_pretrained(tmp_path / "cfg")
    state = {"state": {"model": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
                       "timestamp": {"batch": 6}, "run_name": "t"},
             "rng": [{"numpy": np.random.RandomState(0).get_state()}]}
    dcp.save(state, checkpoint_id=str(tmp_path / "ep0-ba6"), no_dist=True)
    convert("composer", tmp_path / "ep0-ba6", "native", tmp_path / "out", config=tmp_path / "cfg")
    assert_same_weights(load(tmp_path / "out"), model)
    (tmp_path / "ep0-ba6" / ".metadata").write_bytes(
        b"\x80\x04cos\nsystem\n\x8c\x04echo\x85R.")  # a pickle that would run a command
    with pytest.raises(ConvertError, match=r"\.metadata: not readable checkpoint metadata.*os.system"):
        convert("composer", tmp_path / "ep0-ba6", "native", tmp_path / "out2", config=tmp_path / "cfg")


# ---------------------------------------------------------------- errors
def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    model = randomise(MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=101,
                                                   layer_pattern="MM", ssm_cfg=SMALL_SSM)))
    model.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    state.pop("backbone.layers.1.mixer.D")
    state["backbone.layers.1.mixer.bogus"] = torch.zeros(1)
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"missing: backbone.layers.1.mixer.D; unexpected: "
                                           r"backbone.layers.1.mixer.bogus"):
        convert("native", tmp_path / "ours", "native", tmp_path / "out")
    state.pop("backbone.layers.1.mixer.bogus")
    state["backbone.layers.1.mixer.D"] = torch.ones(3)
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"d_model=64, n_layer=2, layers=MM.*wrong shape: "
                                           r"backbone.layers.1.mixer.D: expected \(8,\), found \(3,\)"):
        convert("native", tmp_path / "ours", "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]  # no temp folder left behind


def test_megatron_shape_errors_name_the_config(tmp_path):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model, num_query_groups=4)
    with pytest.raises(ConvertError, match=r"linear_qkv.weight has 96 rows, expected .*\(8 \+ 2\*4\)\*8"):
        convert("megatron", tmp_path / "meg", "native", tmp_path / "out")


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path, capsys):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model)
    file = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert main(["--from", "megatron", str(tmp_path / "meg"), "--to", "native", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {file}: not a readable checkpoint") and err.count("\n") == 1
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8,
                                                             "num_hidden_layers": 1, "vocab_size": 8}))
    (tmp_path / "hf" / "model.safetensors").write_text("hello")
    assert main(["--from", "hf", str(tmp_path / "hf"), "--to", "native", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a readable checkpoint" in err and err.count("\n") == 1
    assert main(["--from", "megatron", str(tmp_path / "hf"), "--to", "native", str(tmp_path / "o")]) == 2
    assert "not a Megatron checkpoint" in capsys.readouterr().err
    model.save_pretrained(tmp_path / "ours")
    weights = tmp_path / "ours" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["--from", "native", str(tmp_path / "ours"), "--to", "hf", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: not a readable checkpoint (tensor ") and "truncated" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


class Payload:
    """Stands in for any class a malicious pickle could name."""


def test_arbitrary_pickles_need_the_explicit_opt_in(tmp_path, capsys):
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model)
    file = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    blob = torch.load(file, weights_only=False)
    blob["payload"] = Payload()
    torch.save(blob, file)
    assert main(["--from", "megatron", str(tmp_path / "meg"), "--to", "native", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "Payload" in err and "--unsafe-pickle" in err
    assert main(["--from", "megatron", str(tmp_path / "meg"), "--to", "native", str(tmp_path / "o"),
                 "--unsafe-pickle"]) == 0
    assert_same_weights(load(tmp_path / "o"), model)


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["--from", "onnx", str(tmp_path), "--to", "native", str(tmp_path / "o")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert main(["--from", "native", str(tmp_path / "nope"), "--to", "native", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    nvidia_hybrid().save_pretrained(tmp_path / "ours")
    (tmp_path / "exists").mkdir()
    assert main(["--from", "native", str(tmp_path / "ours"), "--to", "native", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--from", "native", str(tmp_path / "ours"), "--to", "native", str(tmp_path / "exists"),
                 "--overwrite", "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "exists" / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}


# ---------------------------------------------------------------- checkpoint dialects (issue 13.9)
@pytest.mark.parametrize("conv_dims", [3, 2])
def test_megatron_conv_stored_as_parameters_converts(tmp_path, conv_dims):
    """Newer Megatron-LM: mixer.conv1d_weight / mixer.conv1d_bias parameters, no conv1d module."""
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model, tp=2)
    for rank in sorted((tmp_path / "meg" / "release").glob("mp_rank_*")):
        blob = torch.load(rank / "model_optim_rng.pt", weights_only=False)
        state = {}
        for key, value in blob["model"].items():
            if key.endswith("mixer.conv1d.weight"):
                key, value = key.replace("conv1d.weight", "conv1d_weight"), (
                    value if conv_dims == 3 else value.squeeze(1))
            state[key.replace("mixer.conv1d.bias", "mixer.conv1d_bias")] = value
        assert any(k.endswith("conv1d_weight") for k in state)
        blob["model"] = state
        torch.save(blob, rank / "model_optim_rng.pt")
    convert("megatron", tmp_path / "meg", "native", tmp_path / "out")
    ours = load(tmp_path / "out")
    assert_same_weights(ours, model)
    assert torch.equal(logits(ours, 256), logits(model, 256))


def grouped_hf_mamba2(n_groups=2):
    """A random transformers 4.x Mamba2 with n_groups > 1 (non-trivial norm weights)."""
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=64, num_heads=8, head_dim=16, n_groups=n_groups, state_size=16, expand=2,
        chunk_size=16, num_hidden_layers=2, vocab_size=96, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("mixer.norm.weight") else 0.05))
    return hf


def per_group_gated_rms_norm(norm, n_groups):
    """The oracle, written here in float64 and independent of our code: Mamba-2's gated RMSNorm per
    group, y = w * rmsnorm_g(x * silu(z)) over groups of d_inner / n_groups channels. This is what
    mamba_ssm computes (mamba_split_conv1d_scan_combined: group_size = dim // ngroups,
    norm_before_gate=False), the kernel transformers 4.x's CUDA training path calls, so the model
    such a checkpoint was trained as."""
    def forward(hidden_states, gate=None):
        x = hidden_states.double() * torch.nn.functional.silu(gate.double())
        g = x.unflatten(-1, (n_groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return (norm.weight.double() * g.flatten(-2)).to(hidden_states.dtype)

    return forward


def test_transformers_4_gated_norm_is_across_channels_in_its_source():
    import inspect

    from transformers.models.mamba2 import modeling_mamba2

    assert int(transformers.__version__.split(".")[0]) < 5
    source = inspect.getsource(modeling_mamba2.MambaRMSNormGated.forward)
    assert "pow(2).mean(-1, keepdim=True)" in source and "group" not in source


def test_hf_4x_grouped_mamba2_converts_per_group_by_default(tmp_path, capsys):
    """A transformers 4.x-saved folder with n_groups=2 is read per group (how such models are
    trained: Mamba-Codestral-7B), not as transformers 4.x's torch path computes it.
    Oracle: transformers' own model with each layer's norm replaced by the float64 per-group gated
    RMSNorm above. Transformers' unmodified torch path (across channels) must differ."""
    hf = grouped_hf_mamba2(n_groups=2)
    hf.save_pretrained(tmp_path / "hf")
    saved_by = json.loads((tmp_path / "hf" / "config.json").read_text())["transformers_version"]
    assert saved_by.startswith("4.")
    assert main(["--from", "hf", str(tmp_path / "hf"), "--to", "native", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "gated RMSNorm (n_groups=2) converted per group" in err
    assert f"the default for every source (saved by transformers {saved_by})" in err
    ours = load(tmp_path / "out")
    assert ours.config.ssm_options("M")["norm_across_channels"] is False
    torch_path = logits(hf, 96)  # transformers 4.x's torch path: norm across all channels
    for layer in hf.backbone.layers:
        layer.mixer.norm.forward = per_group_gated_rms_norm(layer.mixer.norm, 2)
    oracle = logits(hf, 96)
    assert rel_err(logits(ours, 96), oracle) <= 1e-4
    assert rel_err(logits(ours, 96), torch_path) > 1e-2  # the two forms really differ here
    # explicit per-group: the same model, and the note says it was asked for
    assert main(["--from", "hf", str(tmp_path / "hf"), "--to", "native", str(tmp_path / "pg"),
                 "--gated-norm", "per-group"]) == 0
    assert "converted per group (state-spaces" in capsys.readouterr().err
    assert_same_weights(load(tmp_path / "pg"), ours)
    assert load(tmp_path / "pg").config == ours.config


def test_hf_4x_grouped_mamba2_converts_across_channels_on_request(tmp_path, capsys):
    """--gated-norm across-channels reproduces transformers 4.x's torch path (for models fine-tuned
    there): its logits and its greedy tokens."""
    hf = grouped_hf_mamba2(n_groups=4)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["--from", "hf", str(tmp_path / "hf"), "--to", "native", str(tmp_path / "out"),
                 "--gated-norm", "across-channels"]) == 0
    err = capsys.readouterr().err
    assert "(n_groups=4) converted across all channels" in err
    assert "as --gated-norm across-channels asks" in err
    ours = load(tmp_path / "out")
    assert ours.config.ssm_options("M")["norm_across_channels"] is True
    assert rel_err(logits(ours, 96), logits(hf, 96)) <= 1e-4
    # greedy decoding (our recurrent step, composed for this norm) gives transformers' tokens
    prompt = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), theirs)


def test_every_source_defaults_to_per_group_and_says_so(tmp_path, capsys):
    """A native folder that records nothing about the norm, and an NVIDIA Megatron checkpoint
    (ngroups 8): per group, with a note naming the choice; a folder that records across-channels
    keeps it."""
    model = nvidia_hybrid()
    write_megatron(tmp_path / "meg", model, tp=1)
    assert main(["--from", "megatron", str(tmp_path / "meg"), "--to", "native", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "(n_groups=8) converted per group" in err and "the default for every source" in err
    assert load(tmp_path / "m").config.ssm_options("M")["norm_across_channels"] is False
    grouped_model(True).save_pretrained(tmp_path / "ac")
    assert main(["--from", "native", str(tmp_path / "ac"), "--to", "native", str(tmp_path / "ac2")]) == 0
    assert "converted across all channels" in capsys.readouterr().err
    assert load(tmp_path / "ac2").config.ssm_options("M")["norm_across_channels"] is True


def grouped_model(across, with_mlp=False):
    """Two Mamba-2 layers, ngroups 4; with_mlp: state-spaces' block form (norm2 + MLP in each
    block), whose decoding goes through the mixer's step rather than the fused block step."""
    return randomise(MambaLMHeadModel(MambaConfig(
        d_model=64, n_layer=2, vocab_size=96, pad_vocab_size_multiple=1, tie_embeddings=False,
        layer_pattern=None if with_mlp else "MM", d_intermediate=80 if with_mlp else 0,
        ssm_cfg={**SMALL_SSM, "ngroups": 4, "norm_across_channels": across,
                 **({"layer": "Mamba2"} if with_mlp else {})})))


@pytest.mark.parametrize("across", [True, False])
def test_decode_steps_follow_the_gated_norm_switch(across):
    """Token-by-token decoding (the fused block step, and the mixer step used under an MLP layer)
    equals the full forward for either norm form."""
    for with_mlp in (False, True):
        model = grouped_model(across, with_mlp)
        assert (model.backbone.layers[0].mlp is not None) == with_mlp
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.norm.weight.add_(torch.randn(layer.mixer.d_inner) * 0.5)
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = model(ids)
            cache = model.allocate_inference_cache(2, 12)
            steps = [model(ids[:, :5], inference_params=cache)]
            cache.seqlen_offset = 5
            for t in range(5, 12):
                steps.append(model(ids[:, t:t + 1], inference_params=cache))
                cache.seqlen_offset += 1
        assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5, with_mlp
    other = grouped_model(not across, with_mlp)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(other(ids), model(ids)) > 1e-3


def test_hf_export_warns_when_the_target_transformers_computes_the_other_norm(tmp_path, capsys):
    installed = transformers.__version__
    per_group, across = grouped_model(False), grouped_model(True)
    per_group.save_pretrained(tmp_path / "pg")
    across.save_pretrained(tmp_path / "ac")
    assert main(["--from", "native", str(tmp_path / "pg"), "--to", "hf", str(tmp_path / "hf_pg")]) == 0
    err = capsys.readouterr().err
    assert f"warning: transformers {installed} normalises Mamba-2's gated RMSNorm across all" in err
    assert main(["--from", "native", str(tmp_path / "pg"), "--to", "hf", str(tmp_path / "hf_pg5"),
                 "--transformers-version", "5.0.0"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["--from", "native", str(tmp_path / "ac"), "--to", "hf", str(tmp_path / "hf_ac5"),
                 "--transformers-version", "5.1.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: transformers 5.1.0 normalises Mamba-2's gated RMSNorm per group" in err
    assert main(["--from", "native", str(tmp_path / "ac"), "--to", "hf", str(tmp_path / "hf_ac")]) == 0
    assert "warning" not in capsys.readouterr().err
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf_ac").eval()
    assert rel_err(logits(hf, 96), logits(across, 96)) <= 1e-4  # the installed 4.x computes the same
    convert("hf", tmp_path / "hf_ac", "native", tmp_path / "back")
    assert load(tmp_path / "back").config == across.config
    hf.save_pretrained(tmp_path / "resaved")  # transformers re-saves it: its version now speaks
    convert("hf", tmp_path / "resaved", "native", tmp_path / "back2")
    assert load(tmp_path / "back2").config.ssm_options("M")["norm_across_channels"] is True


def test_gated_norm_flag_round_trips_and_state_spaces_says_it_cannot(tmp_path, capsys):
    model = grouped_model(False)
    model.save_pretrained(tmp_path / "pg")
    assert main(["--from", "native", str(tmp_path / "pg"), "--to", "native", str(tmp_path / "ac"),
                 "--gated-norm", "across-channels"]) == 0
    assert load(tmp_path / "ac").config.ssm_options("M")["norm_across_channels"] is True
    assert main(["--from", "native", str(tmp_path / "ac"), "--to", "state-spaces", str(tmp_path / "ss")]) == 0
    assert "no state-spaces equivalent" in capsys.readouterr().err
    assert load(tmp_path / "ss").config.ssm_options("M")["norm_across_channels"] is True
    convert("native", tmp_path / "pg", "state-spaces", tmp_path / "ss_pg")
    written = json.loads((tmp_path / "ss_pg" / "config.json").read_text())
    assert "norm_across_channels" not in written["ssm_cfg"]  # mamba_ssm's Mamba2 would reject it
    with pytest.raises(SystemExit) as exit_:
        main(["--from", "native", str(tmp_path / "pg"), "--to", "native", str(tmp_path / "x"),
              "--gated-norm", "sideways"])
    assert exit_.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="norm_across_channels"):
        MambaConfig(d_model=64, n_layer=1, vocab_size=96, ssm_cfg={
            "layer": "Mamba2", **SMALL_SSM, "norm_across_channels": True, "norm_before_gate": True})
