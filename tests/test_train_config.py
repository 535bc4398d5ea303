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


def test_fsdp_on_cpu_chooses_fsdp2_unless_another_version_is_asked_for(shards, tmp_path, monkeypatch):
    config = base(shards, tmp_path, fsdp={"sharding_strategy": "FULL_SHARD"}, device="cpu")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert prepare([config])[1]["choose_fsdp2"]  # main sets FSDP_VERSION=2 and says so
    assert "FSDP_VERSION" not in os.environ  # prepare itself changes nothing
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert not prepare([config])[1]["choose_fsdp2"]
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP_VERSION=1: .* unset FSDP_VERSION"):
        prepare([config])


def test_run_name_in_save_and_export_folders_makes_them_per_run():
    tiny = str(ROOT / "yamls" / "tiny.yaml")
    cfg = parse_config(load_yaml(tiny))  # make demo (README): runs/tiny/checkpoints, runs/tiny/model
    assert (cfg.save_folder, cfg.export_folder) == ("runs/tiny/checkpoints", "runs/tiny/model")
    cfg = parse_config(load_yaml(tiny, ["run_name=mamba-4242"]))  # slurm.sh names each job's run
    assert (cfg.save_folder, cfg.export_folder) == ("runs/mamba-4242/checkpoints", "runs/mamba-4242/model")


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


# ---- ranges: every bounded number, found by walking the config's dataclasses --------------
def bounded_fields(cls=None, prefix="config"):
    """(path, bounds, type) for every field declared with strict.bounded, sections included."""
    import dataclasses
    import typing

    from mamba.train_config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if "bounds" in f.metadata:
            yield f"{prefix}.{f.name}", f.metadata["bounds"], tp
        options = [tp, *typing.get_args(tp)]
        for option in options:
            if dataclasses.is_dataclass(option):
                yield from bounded_fields(option, f"{prefix}.{f.name}")
                break


def outside(bounds):
    """Values just outside each end of the range (none of them an allowed special value)."""
    out = []
    if bounds["gt"] is not None:
        out.append(bounds["gt"])
    if bounds["ge"] is not None:
        low = bounds["ge"] - 1
        while low in bounds["also"]:
            low -= 1
        out.append(low)
    if bounds["lt"] is not None:
        out.append(bounds["lt"])
    if bounds["le"] is not None:
        out.append(bounds["le"] + 1)
    return out


def with_value(values, dotted, value):
    import copy

    values = copy.deepcopy(values)
    node = values
    keys = dotted.split(".")[1:]
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if keys[-1] == "betas":
        value = [0.9, value]
    if keys[-1] == "n_total_tokens":  # instead of max_duration
        values.pop("max_duration")
    node[keys[-1]] = value
    return values


BASE = {"model": {"vocab_size": 258, "d_model": 32, "n_layer": 1}, "max_duration": "10ba",
        "data": {"local": "unused", "seq_len": 8, "global_batch_size": 2, "micro_batch_size": 1}}
BOUNDED = list(bounded_fields())


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    from mamba.train_config import TrainConfig

    def numeric(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = [hints[f.name], *typing.get_args(hints[f.name])]
            args += [a2 for a in args for a2 in typing.get_args(a)]
            if any(a in (int, float) for a in args):
                yield f"{prefix}.{f.name}"
            for a in args:
                if dataclasses.is_dataclass(a):
                    yield from numeric(a, f"{prefix}.{f.name}")
                    break

    elsewhere = {"config.model.attn_layer_idx"}  # MambaConfig checks each index against n_layer
    assert sorted(set(numeric(TrainConfig, "config")) - elsewhere) == sorted(p for p, _, _ in BOUNDED)
    with pytest.raises(ConfigError, match="attn_layer_idx"):
        parse_config({**BASE, "model": {**BASE["model"], "attn_layer_idx": [3]}})
    assert len(BOUNDED) >= 30


@pytest.mark.parametrize("path,bounds,tp", BOUNDED, ids=[p for p, _, _ in BOUNDED])
def test_each_range_is_enforced_with_one_line(path, bounds, tp):
    bad_values = outside(bounds) + ([float("nan"), float("inf")] if float in typing_args(tp) else [])
    assert bad_values
    for bad in bad_values:
        with pytest.raises(ConfigError) as err:
            parse_config(with_value(BASE, path, bad))
        message = str(err.value)
        assert message.startswith(f"{path}{'[1]' if path.endswith('betas') else ''}="), message
        assert "must be" in message and "\n" not in message
    for good in (bounds["ge"], bounds["le"], *bounds["also"]):  # the ends themselves are allowed
        if good is not None:
            parse_config(with_value(BASE, path, good))


def typing_args(tp):
    import typing

    return [tp, *typing.get_args(tp)]


@pytest.mark.parametrize("over,message", [
    ({"optimizer": {"lr": -1e-3}}, "config.optimizer.lr=-0.001: must be > 0"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "config.optimizer.betas[1]=1.0: must be >= 0 and < 1"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas=[0.9]: expected two numbers"),
    ({"optimizer": {"eps": 0}}, "config.optimizer.eps=0.0: must be > 0"),
    ({"optimizer": {"weight_decay": -0.1}}, "config.optimizer.weight_decay=-0.1: must be >= 0"),
    ({"grad_clip_norm": -1}, "config.grad_clip_norm=-1.0: must be >= 0"),
    ({"scheduler": {"alpha_f": 1.5}}, "config.scheduler.alpha_f=1.5: must be >= 0 and <= 1"),
    ({"scheduler": {"warmup": "11ba"}}, "scheduler.warmup='11ba' is longer than the run (10ba)"),
    ({"scheduler": {"warmup": "161tok"}}, "scheduler.warmup='161tok' is longer than the run (10ba)"),
    ({"scheduler": {"warmup": "21sp"}}, "scheduler.warmup='21sp' is longer than the run"),
    ({"scheduler": {"warmup": "1.5dur"}}, "scheduler.warmup='1.5dur': a fraction of the run must be at most"),
    ({"max_duration": None, "data": {**BASE["data"], "n_total_tokens": 100}, "scheduler": {"warmup": "7ba"}},
     "is longer than the run (data.n_total_tokens=100)"),
    ({"max_duration": "0ba"}, "max_duration='0ba': must be at least 1"),
    ({"max_duration": "0.5dur"}, "max_duration='0.5dur': give the length itself"),
    ({"max_duration": "1.5ba"}, "max_duration='1.5ba': ba counts must be whole numbers"),
    ({"eval_interval": "0ba"}, "eval_interval='0ba': must be at least 1"),
    ({"save_interval": "2dur"}, "save_interval='2dur': must be between 0 and 1"),
    ({"console_log_interval": "0ep"}, "console_log_interval='0ep': must be at least 1"),
    ({"loggers": {"console": {"log_interval": "0ba"}}}, "loggers.console.log_interval='0ba'"),
    ({"eval_subset_num_batches": 0},
     "config.eval_subset_num_batches=0: must be -1 (the whole eval split) or >= 1"),
    ({"save_num_checkpoints_to_keep": -2}, "must be -1 (keep all) or >= 0"),
    ({"data": {**BASE["data"], "micro_batch_size": 0}}, "config.data.micro_batch_size=0: must be >= 1"),
    ({"data": {**BASE["data"], "num_workers": -1}}, "config.data.num_workers=-1: must be >= 0"),
    ({"seed": 2 ** 32}, "config.seed=4294967296: must be >= 0 and <= 4294967295"),
    ({"model": {**BASE["model"], "ssm_cfg": {"d_state": 0}}},
     "model.ssm_cfg.d_state=0: must be an integer >= 1"),
    ({"model": {**BASE["model"], "attn_cfg": {"num_heads": -2}}}, "model.attn_cfg.num_heads=-2"),
    ({"model": {**BASE["model"], "ssm_cfg": {"dt_min": 0.2, "dt_max": 0.1}}},
     "model.ssm_cfg.dt_min=0.2 > dt_max=0.1: dt_min must not exceed dt_max"),
    ({"fsdp": {"process_group": "node"}}, "fsdp.process_group='node': only null (the default process group"),
    ({"optimizer": {"betas": [0.9, 0.95], "beta2": 0.99}},
     "optimizer.betas=[0.9, 0.95] and optimizer.beta2 both set"),
])
def test_range_and_spelling_mistakes_are_one_line(over, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **over})
    assert str(err.value).startswith(message) or message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_warmup_within_the_run_and_legacy_betas_pass():
    ok = parse_config({**BASE, "scheduler": {"warmup": "160tok"}, "optimizer": {"beta1": 0.8}})
    assert ok.optimizer.betas == [0.8, 0.95]
    assert parse_config({**BASE, "optimizer": {"beta2": 0.99}}).optimizer.betas == [0.9, 0.99]
    assert parse_config(BASE).optimizer.betas == [0.9, 0.95]
    assert parse_config({**BASE, "scheduler": {"warmup": "1dur"}, "fsdp": {"process_group": None}}).fsdp
    assert parse_config({**BASE, "max_duration": "1ep", "scheduler": {"warmup": "100ba"}})  # data decides


def test_cli_range_error_exits_2_fast_with_one_line_and_writes_nothing(shards, tmp_path):
    cfg = base(shards, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra in ([], ["--check"]):
        result = subprocess.run([sys.executable, str(ROOT / "mamba" / "train.py"), cfg, "optimizer.lr=-1e-3",
                                 *extra], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == ["error: config.optimizer.lr=-0.001: must be > 0"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
