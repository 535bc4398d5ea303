"""Bad configurations exit with code 2 and one clear line, and write nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mamba.strict import ConfigError
from mamba.train import prepare
from mamba.train_config import derived_batching, load_yaml, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    from data.prepare import prepare as prepare_data

    texts = tmp_path_factory.mktemp("src") / "docs.jsonl"
    texts.write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(200)))
    prepare_data(inputs=[str(texts)], output=str(out), seq_len=64, val_ratio=0.1, progress=False)
    return out


def base(shards, tmp_path, **over):
    cfg = {
        "variables": {"name": "t"},
        "run_name": "${variables.name}",
        "model": {"vocab_size": 258, "d_model": 32, "n_layer": 2, "layer_pattern": "M*",
                  "ssm_cfg": {"d_state": 8, "headdim": 16, "chunk_size": 16},
                  "attn_cfg": {"num_heads": 2}},
        "data": {"local": str(shards), "seq_len": 64, "global_batch_size": 4, "micro_batch_size": 2},
        "max_duration": "2ba",
        "save_folder": str(tmp_path / "ck"),
    }
    for path, value in over.items():
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


DELETE = object()


def test_a_good_config_parses_with_variables_and_overrides(shards, tmp_path):
    cfg = parse_config(load_yaml(base(shards, tmp_path), ["optimizer.lr=1e-3", "fsdp.verbose=true"]))
    assert cfg.run_name == "t" and cfg.optimizer.lr == 1e-3 and cfg.fsdp.verbose
    assert cfg.model.mamba_config().layer_kinds() == ["M", "*"]
    assert derived_batching(cfg, 2) == (2, 1)


@pytest.mark.parametrize("over,args,message", [
    ({"optimizer": {"lrr": 1}}, [], "unknown key config.optimizer.lrr; did you mean config.optimizer.lr?"),
    ({}, ["fsdp.sharding_stratgy=FULL_SHARD"],
     "unknown key config.fsdp.sharding_stratgy; did you mean config.fsdp.sharding_strategy?"),
    ({}, ["fsdp.sharding_strategy=FULL_SHARDED"], "did you mean 'FULL_SHARD'?"),
    ({"data.micro_batch_size": "two"}, [], "config.data.micro_batch_size='two': expected an integer"),
    ({"data.global_batch_size": 6, "data.micro_batch_size": 4}, [],
     "data.global_batch_size=6 / world size 1 = 6 per device is not divisible by data.micro_batch_size=4"),
    ({"data.seq_len": 20000}, [], "data.seq_len=20000 exceeds the int32 DataLayout limit 16384"),
    ({"data.seq_len": 128}, [], "but the shards in"),
    ({"data.local": "/nonexistent/data"}, [], "data.local='/nonexistent/data' does not exist"),
    ({"model.vocab_size": 100}, [],
     "model.vocab_size=100 is smaller than the shards' tokenizer vocabulary 258"),
    ({"model.ssm_cfg": {"headdim": 24}}, [], "model: MambaConfig.ssm_cfg.headdim=24"),
    ({"max_duration": "10 batches"}, [], "max_duration='10 batches': expected a duration"),
    ({"max_duration": DELETE}, [], "give exactly one of max_duration"),
    ({"precision": "amp_bf16"}, [], "CPU training must be fp32"),
    ({"data.global_batch_size": DELETE}, [], "missing required key config.data.global_batch_size"),
    ({}, ["optimizer.lr"], "is not key=value"),
])
def test_bad_config_is_one_clear_error(shards, tmp_path, over, args, message):
    with pytest.raises(ConfigError) as err:
        prepare([base(shards, tmp_path, **over), *args])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_fsdp_on_cpu_without_fsdp2_is_refused(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ConfigError, match="set FSDP_VERSION=2"):
        prepare([base(shards, tmp_path, fsdp={"sharding_strategy": "FULL_SHARD"})])


def test_cli_exits_2_with_one_line_and_writes_nothing(shards, tmp_path):
    cfg = base(shards, tmp_path, **{"optimizer": {"weight_decy": 0.1}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "mamba" / "train.py"), cfg],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key config.optimizer.weight_decy; did you mean config.optimizer.weight_decay?"]
    assert not (tmp_path / "ck").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_broken_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_yaml(str(bad))
