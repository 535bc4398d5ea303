"""Resuming across requeues and nodes: old checkpoints are pruned, and two nodes sharing one
save folder (the multi-node setup) start and autoresume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mamba.train import prune_checkpoints

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = str(Path(sys.executable).parent / "composer")


def test_prune_keeps_the_newest_and_what_latest_points_at(tmp_path):
    names = ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt", "ep1-ba10-rank0.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ep0-ba8").mkdir()  # a sharded checkpoint is a folder
    (tmp_path / "ep0-ba8" / "__0_0.distcp").write_bytes(b"x")
    others = ["loss_curve.json", "ep0-ba1-rank0.pt.tmp", "notes-ba1.pt", "ep0-ba3-rank0.txt"]
    for name in others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ep0-ba0").write_bytes(b"x")  # not a folder, not a .pt: not a checkpoint
    os.symlink("ep0-ba4-rank0.pt", tmp_path / "latest-rank0.pt")  # e.g. the one just resumed from

    deleted = prune_checkpoints(str(tmp_path), keep=2)

    # ba10 > ba8 > ba6 by number (not by name); ba4 stays while latest-rank0.pt points at it
    assert sorted(deleted) == ["ep0-ba2-rank0.pt", "ep0-ba6-rank0.pt"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ep0-ba4-rank0.pt", "ep1-ba10-rank0.pt", "ep0-ba8", "latest-rank0.pt",
                           "ep0-ba0", *others])
    assert prune_checkpoints(str(tmp_path), keep=2) == []
    assert prune_checkpoints(str(tmp_path), keep=-1) == []
    assert prune_checkpoints(str(tmp_path / "no"), keep=1) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(config: Path, work: Path, max_duration: str) -> list[str]:
    """Two composer launchers started together, as slurm.sh starts one per node: world size 2,
    one rank each, node ranks 0 and 1, one save folder for both. Node 1 gets its own /dev/shm
    (where streaming keeps its per-node state), as a second machine would have."""
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cwd = work / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [COMPOSER, "--world_size", "2", "--nproc", "1", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "mamba" / "train.py"),
               str(config), f"max_duration={max_duration}"]
        if node == 1:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node1", *cmd]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    if any(proc.returncode for proc in procs):
        raise AssertionError("\n\n".join(o[-4000:] for o in outputs))
    return outputs


def own_shm_namespace_works() -> bool:
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not own_shm_namespace_works(), reason="node 1 own /dev/shm: needs unshare (root)")
# Under a real Slurm (CI), tests/test_slurm.py::test_two_nodes_requeued_mid_run_resume_the_curve runs
# this scenario through slurm.sh (shared save folder, autoresume on both nodes, pruning, export):
# this launcher-level twin is for a machine without Slurm, and is not run twice.
@pytest.mark.skipif(os.environ.get("MAMBA_REQUIRE_SLURM") == "1",
                    reason="run under a real Slurm by tests/test_slurm.py (MAMBA_REQUIRE_SLURM=1)")
@pytest.mark.timeout(1200)  # four launches, two at a time
def test_two_nodes_share_a_save_folder_and_autoresume(shards, tmp_path):
    save = tmp_path / "shared" / "ck"
    cfg = {
        "run_name": "two-nodes", "seed": 5,
        "model": {"vocab_size": 258, "d_model": 32, "n_layer": 2, "layer_pattern": "M*",
                  "ssm_cfg": {"d_state": 8, "headdim": 16, "chunk_size": 16}, "attn_cfg": {"num_heads": 2}},
        "data": {"local": str(shards), "seq_len": 64, "global_batch_size": 4, "micro_batch_size": 2,
                 "num_canonical_nodes": 1},
        "optimizer": {"lr": 3e-3}, "scheduler": {"name": "constant", "warmup": "0ba"},
        "max_duration": "4ba", "eval_interval": "1000ba", "eval_subset_num_batches": 1,
        "save_folder": str(save), "save_interval": "2ba", "save_num_checkpoints_to_keep": 1,
        "autoresume": True, "progress_bar": False, "callbacks": {"loss_curve": {}},
        "export_folder": str(tmp_path / "shared" / "{run_name}" / "model"),
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))

    launch_two_nodes(config, tmp_path, "4ba")  # Composer's own autoresume: FileNotFoundError here
    assert sorted(p.name for p in save.glob("ep*")) == ["ep0-ba4-rank0.pt"]
    first = json.loads((save / "loss_curve.json").read_text())
    assert first["batch"] == [1, 2, 3, 4]

    outputs = launch_two_nodes(config, tmp_path, "8ba")  # the same command, longer: resumes at batch 4
    curve = json.loads((save / "loss_curve.json").read_text())
    assert curve["batch"] == list(range(1, 9)), curve["batch"]
    assert curve["loss"][:4] == first["loss"]
    # Composer pruned only ba6 (its own); ba4, from before the restart, goes too
    assert sorted(p.name for p in save.glob("ep*")) == ["ep0-ba8-rank0.pt"]
    assert "removed old checkpoint" in outputs[0] and "ep0-ba4-rank0.pt" in outputs[0]
    assert (tmp_path / "shared" / "two-nodes" / "model" / "model.safetensors").is_file()
