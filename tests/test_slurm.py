"""`sbatch slurm.sh` and `sbatch neuron/slurm.sh` under a real Slurm: tests/slurm/cluster.sh starts
munged, slurmctld and two slurmd nodes on this machine (each node with its own /dev/shm, /tmp shared
as the cluster file system), and the jobs train for real on CPU.

Needs root and Debian's `slurm-wlm munge`; skipped otherwise, saying so. .ci/run installs them and
sets MAMBA_REQUIRE_SLURM=1, which turns that skip into a failure."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
VENV = Path(sys.executable).parent.parent
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}
BATCHES, SAVE_EVERY = 24, 4
LAST_TWO = [f"ep0-ba{BATCHES - SAVE_EVERY}-rank0.pt", f"ep0-ba{BATCHES}-rank0.pt"]  # tiny.yaml keeps 2


def _why_no_slurm() -> str | None:
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged")
               if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"no {', '.join(missing)}: apt-get install -y slurm-wlm munge (as root; .ci/run does)"
    if os.geteuid() != 0:
        return "starting a local Slurm (tests/slurm/cluster.sh) needs root; .ci/run runs as root"
    return None


class Cluster:
    def __init__(self, conf: str):
        self.env = {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", "VENV": str(VENV),
                    "PYTHONPATH": str(ROOT)}
        self.env.pop("PJRT_DEVICE", None)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env=self.env, capture_output=True,
                               text=True, timeout=30).stdout.split()
        self.nodes = sorted(set(nodes))

    def sbatch(self, script: str, *args: str, nodes: int, out: Path | None, cwd: Path = ROOT,
               options: tuple[str, ...] = (), **env: str) -> str:
        """Submits from cwd; out=None keeps the script's own --output."""
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", *([f"--output={out}"] if out else []), *options,
               str(script), *args]
        proc = subprocess.run(cmd, cwd=cwd, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                              text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: str, out: Path, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ENDED:
                return info
            time.sleep(1)
        subprocess.run(["scancel", job_id], env=self.env)
        pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s; log:\n{_tail(out)}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def cluster():
    reason = _why_no_slurm()
    was_running = not reason and subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    if not reason:
        started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
        if started.returncode != 0:  # e.g. a container that may not mount its own /dev/shm
            reason = f"the local Slurm did not start: {(started.stderr or started.stdout).strip()}"
    if reason:
        if os.environ.get("MAMBA_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    conf = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    yield Cluster(conf)
    if not was_running:  # a cluster someone started by hand stays up
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two different corpora (the bundled one, and the same documents reversed) prepared as
    shards, and a tiny config; everything under /tmp, which the 'nodes' share."""
    from data import TINY_CORPUS
    from data.prepare import prepare

    tmp = tmp_path_factory.mktemp("slurm")
    reversed_docs = tmp / "reversed.jsonl"
    with open(TINY_CORPUS) as src, open(reversed_docs, "w") as dst:
        for line in src:
            dst.write(json.dumps({"text": json.loads(line)["text"][::-1]}) + "\n")
    for name, corpus, seq_len in (("a", TINY_CORPUS, 64), ("b", reversed_docs, 64), ("n1", TINY_CORPUS, 128)):
        prepare(inputs=[str(corpus)], output=str(tmp / f"data-{name}"), seq_len=seq_len, val_ratio=0.0,
                progress=False)
    shutil.copytree(tmp / "data-n1", tmp / "data-n2")  # the neuron jobs run at once: fresh shards each
    cfg = yaml.safe_load((ROOT / "yamls/tiny.yaml").read_text())
    cfg["model"].update(d_model=32, n_layer=2, layer_pattern="M*", d_intermediate=0,
                        ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16}, attn_cfg={"num_heads": 2})
    # num_canonical_nodes fixed: the same global sample order on 1 and on 2 nodes
    cfg["data"].update(local=str(tmp / "data-a"), seq_len=64, global_batch_size=4, micro_batch_size=2,
                       eval_batch_size=4, eval_split=None, num_canonical_nodes=2)
    cfg["variables"].update(seq_len=64, run_name="unused")
    cfg.update(max_duration=f"{BATCHES}ba", save_interval=f"{SAVE_EVERY}ba",
               export_folder=str(tmp / "export" / "{run_name}"),  # jobs at once: one folder per run
               sample=None, progress_bar=False, loggers={})
    cfg["optimizer"]["lr"] = 1e-2
    cfg["scheduler"]["warmup"] = "1ba"
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cfg["export_folder"] = None
    cfg["data"].update(local=str(tmp / "data-n1"), seq_len=128)  # neuron: a multiple of the 128 chunk
    cfg["variables"]["seq_len"] = 128
    (tmp / "cfg-neuron.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def _curve(save_folder: Path) -> dict:
    return json.loads((save_folder / "loss_curve.json").read_text())


def _checkpoints(save_folder: Path) -> list[str]:
    return sorted(p.name for p in save_folder.glob("ep*-ba*-rank0.pt"))


def _cache_in(log: Path) -> Path:
    """The LOCAL_CACHE slurm.sh chose, from its first line."""
    return Path(re.search(r"cached in (\S+)", log.read_text()).group(1))


def _neuron_missing() -> str:
    from neuron.runtime import missing_packages

    missing = missing_packages()
    return f"needs {' and '.join(missing)}: pip install -r neuron/requirements-cpu-test.txt" * bool(missing)


@pytest.fixture(scope="module")
def runs(cluster, work):
    """Every training job of this file, run side by side (slurm.conf.in lets up to four jobs share a
    node) so that start-ups and the requeue's wait overlap:
    - a 2-node job, submitted first and alone, requeued (`scontrol requeue`) as soon as its first
      checkpoint exists; the others are submitted then, and start while it waits to run again;
    - two 1-node jobs, one per node, with different DATA_REMOTE and every other knob left at its
      default (save folder, cache);
    - neuron/slurm.sh on 1 and on 2 nodes (when the neuron packages are there)."""
    name = f"slurmtest{os.getpid()}"
    submitted = {}
    # the 2-node job first: it is the one that must be caught mid-run
    out, save_folder = work / "two-nodes.out", work / "ck-two-nodes"
    submitted["requeue"] = (cluster.sbatch("slurm.sh", str(work / "cfg.yaml"), nodes=2, out=out,
                                           SAVE_FOLDER=str(save_folder), DATA_REMOTE=str(work / "data-a"),
                                           LOCAL_CACHE=str(work / "cache-two-nodes")), out)
    job_id, out = submitted["requeue"]
    first = save_folder / f"ep0-ba{SAVE_EVERY}-rank0.pt"
    deadline = time.monotonic() + 600
    while not first.exists() and time.monotonic() < deadline:
        assert cluster.job(job_id).get("JobState") in ("PENDING", "RUNNING"), _tail(out)
        time.sleep(0.05)
    assert first.exists(), _tail(out)
    requeue = subprocess.run(["scontrol", "requeue", job_id], env=cluster.env, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    # requeued before the end: the last checkpoint was not written yet
    last_before_requeue = (save_folder / f"ep0-ba{BATCHES}-rank0.pt").exists()

    for corpus, node in (("a", 0), ("b", 1)):
        out = work / f"one-node-{corpus}.out"
        job_id = cluster.sbatch("slurm.sh", str(work / "cfg.yaml"), nodes=1, out=out,
                                options=(f"--job-name={name}", f"--nodelist={cluster.nodes[node]}"),
                                DATA_REMOTE=str(work / f"data-{corpus}"))
        submitted[corpus] = (job_id, out)
    neuron_missing = _neuron_missing()
    for nodes in () if neuron_missing else (1, 2):
        out = work / f"neuron-{nodes}.out"
        job_id = cluster.sbatch(
            "neuron/slurm.sh", str(work / "cfg-neuron.yaml"), "--max-steps", "3", "--log-every", "1",
            "--checkpoint-every", "2", "--metrics-file", str(work / f"neuron-{nodes}.jsonl"), nodes=nodes,
            out=out, VENV=str(VENV), CORES_PER_NODE="1", NXD_CPU_MODE="1", DATA=str(work / f"data-n{nodes}"),
            CHECKPOINT_DIR=str(work / f"ck-neuron-{nodes}"),
            COMPILE_CACHE=str(work / f"neuron-cache-{nodes}"))
        submitted[f"neuron-{nodes}"] = (job_id, out)

    results = {key: (cluster.wait(job_id, out), job_id, out) for key, (job_id, out) in submitted.items()}
    yield {"name": name, "results": results, "last_before_requeue": last_before_requeue,
           "neuron_missing": neuron_missing}
    for key in ("a", "b"):
        _, job_id, out = results[key]
        shutil.rmtree(ROOT / "checkpoints" / f"{name}-{job_id}", ignore_errors=True)
        if "cached in" in out.read_text():
            shutil.rmtree(_cache_in(out), ignore_errors=True)
    if (ROOT / "checkpoints").is_dir() and not any((ROOT / "checkpoints").iterdir()):
        (ROOT / "checkpoints").rmdir()


def test_one_node_jobs_at_once_each_on_its_own_data_and_save_folder(runs, work):
    name, results = runs["name"], runs["results"]
    curves = {}
    for corpus in ("a", "b"):
        info, job_id, out = results[corpus]
        remote = work / f"data-{corpus}"
        assert info["JobState"] == "COMPLETED", f"job {job_id}: {info.get('Reason')}\n{_tail(out)}"
        # the default save folder is this job's own: a new sbatch never resumes an older run
        save_folder = ROOT / "checkpoints" / f"{name}-{job_id}"
        assert re.search(rf"\brun={name}-{job_id}\b", out.read_text())
        curve = _curve(save_folder)
        assert curve["batch"] == list(range(1, BATCHES + 1))
        assert curve["loss"][-1] < curve["loss"][0] - 1.0, curve["loss"]
        assert _checkpoints(save_folder) == LAST_TWO
        # the shards each job read came from its own remote, into a cache of its own (one per remote)
        cache = _cache_in(out)
        assert cache.name == hashlib.sha256(str(remote).encode()).hexdigest()[:16], cache
        indexes = {p.read_text() for p in cache.rglob("index.json")}
        assert indexes == {(remote / "train" / "index.json").read_text()}, cache
        curves[corpus] = curve["loss"]
        # export_folder has {run_name}: jobs running at once each export their own model
        assert (work / "export" / f"{name}-{job_id}" / "model.safetensors").is_file()
    a, b = results["a"][0], results["b"][0]
    assert a["NodeList"] != b["NodeList"]
    assert a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"]  # side by side
    assert _cache_in(results["a"][2]) != _cache_in(results["b"][2])
    # different text, different curves (the same curve = one job trained on the other's data)
    assert max(abs(x - y) for x, y in zip(curves["a"][1:], curves["b"][1:], strict=True)) > 0.05


def test_two_nodes_requeued_mid_run_resume_the_curve(runs, work):
    """2 nodes, one rank each: `scontrol requeue` once a checkpoint exists; the requeued job resumes
    from it and ends with the loss curve of the uninterrupted 1-node run on the same data."""
    info, job_id, out = runs["results"]["requeue"]
    save_folder = work / "ck-two-nodes"
    assert not runs["last_before_requeue"]  # requeued before the end
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", f"{info.get('Reason')}\n{_tail(out)}"
    assert info["Restarts"] == "1" and log.count("nodes=2 x 1 rank(s) on CPU") == 2, log[-3000:]
    curve = _curve(save_folder)
    assert curve["batch"] == list(range(1, BATCHES + 1))
    reference = _curve(ROOT / "checkpoints" / f"{runs['name']}-{runs['results']['a'][1]}")
    assert curve["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-4)
    assert _checkpoints(save_folder) == LAST_TWO  # the ones from before the requeue pruned
    # by the recipe (Composer prunes only what its own process saved); which ones depends on how far
    # the first run got before the requeue stopped it, but the resumed-from one always goes
    assert "removed old checkpoint" in log, log[-3000:]
    assert (work / "export" / f"mamba-{job_id}" / "model.safetensors").is_file()


@pytest.mark.parametrize("nodes", [1, 2])
def test_neuron_slurm_trains_on_cpu(runs, work, nodes):
    """neuron/slurm.sh: one torchrun per node, one gloo rank each (NXD_CPU_MODE=1), the tiny model
    on the 128-token shards; data parallel over the nodes."""
    if runs["neuron_missing"]:
        pytest.skip(runs["neuron_missing"])
    info, job_id, out = runs["results"][f"neuron-{nodes}"]
    metrics, ck = work / f"neuron-{nodes}.jsonl", work / f"ck-neuron-{nodes}"
    assert info["JobState"] == "COMPLETED", f"{info.get('Reason')}\n{_tail(out)}"
    assert f"world {nodes} (tp 1 x dp {nodes})" in out.read_text()
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3] and steps[-1]["loss"] < steps[0]["loss"]
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_2", "step_3"]


def test_scripts_are_accepted_by_sbatch_and_log_where_a_fresh_clone_can(cluster, tmp_path):
    """No GPU gres asked by default (a cluster without GPUs refused the job); the log lands in the
    submit folder, which exists (a log folder a fresh clone lacks made Slurm drop the job without a
    word); a missing venv is one line there and exit 2, before any folder is made."""
    for script, name, tool in (("slurm.sh", "mamba", "composer"),
                               ("neuron/slurm.sh", "mamba-neuron", "torchrun")):
        job_id = cluster.sbatch(str(ROOT / script), nodes=1, out=None, cwd=tmp_path,
                                VENV=str(tmp_path / "no-venv"))
        log = tmp_path / f"slurm-{name}-{job_id}.out"
        info = cluster.wait(job_id, log, timeout=120)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and f"no {tool} in VENV={tmp_path / 'no-venv'}" in lines[0], lines
        assert [p.name for p in tmp_path.iterdir()] == [log.name]
        log.unlink()


@pytest.mark.parametrize("script", ["slurm.sh", "neuron/slurm.sh"])
def test_without_the_venv_one_line_and_nothing_written(script, tmp_path):
    """Off the cluster too (no Slurm needed): a missing composer / torchrun is named, exit 2."""
    proc = subprocess.run(["bash", str(ROOT / script)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "VENV": str(tmp_path / "no-venv")}, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stdout + proc.stderr
    assert "VENV=" in proc.stderr and list(tmp_path.iterdir()) == []
