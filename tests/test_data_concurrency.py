"""Several processes, nodes and jobs reading data at once: shared shard folders, shared caches,
streaming's shared-memory prefix, and segments left behind by a kill -9.

The processes are real (subprocesses, each its own streaming "world"). Where a race needs a
precise moment, a ``sitecustomize`` in the children makes them meet there (each waits until all
have arrived) before going on: the interleaving that used to fail then happens every time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.dataset import PackedDataset
from data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = str(Path(sys.executable).parent / "composer")
SHM_DIR = Path("/dev/shm")  # where Linux keeps shared memory segments
SEQ_LEN = 32

# Children meet (all wait for all) once, at the first of:
#   MEET_AT=decompress: renaming a decompressed shard onto its final name (*.mds);
#   MEET_AT=register:   creating streaming's NNNNNN_locals segment (after streaming's own scan for
#                       a free prefix), or taking data.shm's machine lock (before its scan).
SITECUSTOMIZE = textwrap.dedent('''
    import os, time
    _dir, _at = os.environ.get("MEET_DIR"), os.environ.get("MEET_AT")
    if _dir:
        _count, _met = int(os.environ["MEET_COUNT"]), []

        def _meet():
            if _met:
                return
            _met.append(1)
            open(os.path.join(_dir, str(os.getpid())), "w").close()
            end = time.time() + 60
            while len(os.listdir(_dir)) < _count and time.time() < end:
                time.sleep(0.005)

        if _at == "decompress":
            _rename, _replace = os.rename, os.replace

            def rename(src, dst, *a, **k):
                if str(dst).endswith(".mds"):
                    _meet()
                return _rename(src, dst, *a, **k)

            def replace(src, dst, *a, **k):
                if str(dst).endswith(".mds"):
                    _meet()
                return _replace(src, dst, *a, **k)

            os.rename, os.replace = rename, replace
        elif _at == "register":
            import fcntl
            from multiprocessing import shared_memory
            _flock, _init = fcntl.flock, shared_memory.SharedMemory.__init__

            def flock(fd, op):
                if op & fcntl.LOCK_EX:
                    try:
                        path = os.readlink("/proc/self/fd/%d" % (fd if isinstance(fd, int) else fd.fileno()))
                    except OSError:
                        path = ""
                    if path.endswith("mamba-streaming.lock"):
                        _meet()
                return _flock(fd, op)

            def init(self, name=None, create=False, size=0, *a, **k):
                if create and name and str(name).endswith("_locals"):
                    _meet()
                return _init(self, name, create, size, *a, **k)

            fcntl.flock, shared_memory.SharedMemory.__init__ = flock, init
''')

# argv: n local [remote]. Imports once, then forks n processes that each build a dataset, read
# every sample in order and print their digest (forking saves n-1 imports of torch and streaming).
READERS = textwrap.dedent('''
    import hashlib, os, sys, traceback
    from data.dataset import PackedDataset
    n, local, remote = int(sys.argv[1]), sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                dataset = PackedDataset(local, remote, "train", shuffle=False, batch_size=2)
                digest = hashlib.sha256(b"".join(s["input_ids"].tobytes() for s in dataset)).hexdigest()
                os.write(1, f"DIGEST {dataset.num_samples} {digest}\\n".encode())  # one write: one line
                code = 0
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.exit(code)  # atexit runs: streaming removes the shared memory it created
        children.append(pid)
    sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children))
''')

# argv: n local. Forks n processes, each its own session (as separate jobs are), that hold a
# dataset's shared memory until killed: each prints its pid and prefix, then sleeps.
HOLDERS = textwrap.dedent('''
    import os, sys, time
    from data.dataset import PackedDataset
    for _ in range(int(sys.argv[1])):
        if os.fork() == 0:
            os.setsid()
            dataset = PackedDataset(sys.argv[2], None, "train", shuffle=False, batch_size=2)
            next(iter(dataset))
            os.write(1, f"HOLDING {os.getpid()} {dataset._shm_prefix_int}\\n".encode())
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
''')


# argv: local port_a port_b. Two jobs of two ranks each (torch.distributed over gloo), forked from
# one import: every rank prints its job, rank and the digest of each sample it read.
TWO_JOBS = textwrap.dedent('''
    import hashlib, json, os, sys, traceback
    import torch.distributed as dist
    from data.dataset import PackedDataset
    children = []
    for job, port in (("a", sys.argv[2]), ("b", sys.argv[3])):
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                try:
                    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                    dist.init_process_group("gloo")
                    dataset = PackedDataset(sys.argv[1], None, "train", shuffle=True, batch_size=2)
                    seen = [hashlib.sha256(s["input_ids"].tobytes()).hexdigest()[:16] for s in dataset]
                    os.write(1, f"SEEN {job} {rank} {json.dumps(seen)}\\n".encode())
                    dist.barrier()
                    dist.destroy_process_group()
                    code = 0
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.exit(code)
            children.append(pid)
    sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children))
''')


def _corpus(path: Path, tag: str, n: int = 80) -> Path:
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    docs = [f"{tag} " + "".join(rng.choice(list("abcdefghij "), size=10 + i % 40)) for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _prepare(root: Path, tag: str) -> Path:
    """A compressed (zstd) dataset of several shards, train split only."""
    out = root / f"data-{tag}"
    prepare([str(_corpus(root / f"{tag}.jsonl", tag))], str(out), SEQ_LEN, val_ratio=0, shard_size=1 << 10,
            progress=False)
    assert len(list((out / "train").glob("shard.*.mds.zstd"))) >= 3
    return out


def _digest(local: Path, remote: Path | None = None) -> tuple[int, str]:
    dataset = PackedDataset(str(local), str(remote) if remote else None, "train", shuffle=False, batch_size=2)
    data = b"".join(s["input_ids"].tobytes() for s in dataset)
    return dataset.num_samples, hashlib.sha256(data).hexdigest()


def _env(tmp: Path, meet_at: str | None = None, count: int = 0) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    if meet_at:
        meet = tmp / f"meet-{meet_at}"
        meet.mkdir()
        env.update(MEET_DIR=str(meet), MEET_AT=meet_at, MEET_COUNT=str(count))
    return env


def _run_all(cmds: list[list[str]], env: dict[str, str], cwd: Path, timeout: float = 300) -> list[str]:
    """Start every command at once; return their outputs, failing with the first failure's output."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd in cmds]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out[-4000:]}"
    return outputs


def _digests(outputs: list[str]) -> list[tuple[int, str]]:
    lines = [line.split() for out in outputs for line in out.splitlines() if line.startswith("DIGEST ")]
    return [(int(line[1]), line[2]) for line in lines]


def test_processes_decompressing_one_shared_folder_at_once_all_read_it(tmp_path: Path) -> None:
    """Issue 17 item 5: nodes (processes with no shared memory in common) reading one folder of
    zstd shards all decompress shard 0 at the same moment; each reads every sample, correctly."""
    data = _prepare(tmp_path, "shared")
    pristine = tmp_path / "pristine"
    shutil.copytree(data, pristine)  # the oracle reads its own copy, alone
    expected = _digest(pristine)

    n = 3
    env = _env(tmp_path, "decompress", n)
    outputs = _run_all([[sys.executable, "-c", READERS, str(n), str(data)]], env, tmp_path)
    assert _digests(outputs) == [expected] * n, outputs[0][-4000:]
    assert len(os.listdir(env["MEET_DIR"])) == n  # they did meet: all were decompressing at once
    train = data / "train"
    assert not [p.name for p in train.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind
    assert len(list(train.glob("*.mds"))) == len(list(train.glob("*.mds.zstd")))


def test_one_cache_two_remotes_each_reads_its_own_data(tmp_path: Path) -> None:
    """Issue 17 item 6: jobs with different remotes and the same cache folder, one after the other,
    and a remote rewritten in place: every read serves the remote's current data."""
    a, b = _prepare(tmp_path, "alpha"), _prepare(tmp_path, "beta")
    want_a, want_b = _digest(a), _digest(b)
    assert want_a != want_b
    remote_a, remote_b = tmp_path / "bucket" / "a", tmp_path / "bucket" / "b"
    shutil.copytree(a, remote_a)
    shutil.copytree(b, remote_b)
    cache = tmp_path / "cache"

    assert _digest(cache, remote_a) == want_a
    assert _digest(cache, remote_b) == want_b
    assert _digest(cache, remote_a) == want_a  # its cache is still there, and still its own
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2
    assert folders[0].startswith("bucket_a_train-") and folders[1].startswith("bucket_b_train-")

    shutil.rmtree(remote_a)
    shutil.copytree(b, remote_a)  # the same remote, rewritten with other data
    assert _digest(cache, remote_a) == want_b


def test_four_datasets_started_at_the_same_instant(tmp_path: Path) -> None:
    """Several jobs on one machine: four processes register streaming's shared memory at the same
    moment (they meet right there); all get their own prefix and read every sample."""
    data = _prepare(tmp_path, "four")
    expected = _digest(data)  # also decompresses every shard first: only the prefix race is left
    n = 4
    env = _env(tmp_path, "register", n)
    outputs = _run_all([[sys.executable, "-c", READERS, str(n), str(data)]], env, tmp_path)
    assert _digests(outputs) == [expected] * n, outputs[0][-4000:]
    assert len(os.listdir(env["MEET_DIR"])) == n


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_jobs_of_two_ranks_started_at_the_same_instant(tmp_path: Path) -> None:
    """The local leaders of two 2-rank jobs register at the same moment; every rank finds its own
    leader's shared memory, and each job reads the epoch once, split between its ranks."""
    data = _prepare(tmp_path, "ranks")
    samples = PackedDataset(str(data), None, "train", shuffle=False, batch_size=2)
    every = sorted(hashlib.sha256(s["input_ids"].tobytes()).hexdigest()[:16] for s in samples)
    env = _env(tmp_path, "register", 2)  # the two leaders meet; the other ranks take no part
    outputs = _run_all([[sys.executable, "-c", TWO_JOBS, str(data), str(_free_port()), str(_free_port())]],
                       env, tmp_path)
    seen = {(line.split()[1], int(line.split()[2])): json.loads(line.split(maxsplit=3)[3])
            for out in outputs for line in out.splitlines() if line.startswith("SEEN ")}
    assert sorted(seen) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for job in "ab":
        first, second = seen[job, 0], seen[job, 1]
        assert len(first) == len(second) == math.ceil(len(every) / 2)
        assert sorted(set(first) | set(second)) == every  # (one sample twice when the count is odd)
    assert len(os.listdir(env["MEET_DIR"])) == 2


def _segments(prefix: int) -> list[str]:
    return sorted(path.name for path in SHM_DIR.glob(f"{prefix:06}_*"))


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs Linux's /dev/shm")
def test_segments_of_a_killed_process_are_cleaned_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A process killed with SIGKILL (its whole process group, as a scheduler does, so Python's
    resource tracker dies too) leaves its segments; the next run succeeds and removes them, while
    the segments of a process still alive stay untouched."""
    data = _prepare(tmp_path, "kill")
    expected = _digest(data)
    env = _env(tmp_path)
    holders = subprocess.Popen([sys.executable, "-c", HOLDERS, "2", str(data)], cwd=tmp_path, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    held: list[tuple[int, int]] = []
    try:
        assert holders.stdout is not None
        for line in holders.stdout:
            if line.startswith("HOLDING "):
                held.append((int(line.split()[1]), int(line.split()[2])))
                if len(held) == 2:
                    break
        assert len(held) == 2, f"holders exited ({holders.poll()}) before holding shared memory"
        (dead, dead_prefix), (live, live_prefix) = held
        assert dead_prefix != live_prefix
        os.killpg(dead, signal.SIGKILL)  # left a zombie until its parent reaps it: gone all the same
        for _ in range(500):
            if Path(f"/proc/{dead}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        left = _segments(dead_prefix)
        assert f"{dead_prefix:06}_locals" in left, left  # what a kill -9 leaves behind
        live_segments = _segments(live_prefix)
        assert f"{live_prefix:06}_locals" in live_segments

        outputs = _run_all([[sys.executable, "-c", READERS, "1", str(data)]], env, tmp_path)
        assert _digests(outputs) == [expected]
        assert _segments(dead_prefix) == []
        assert _segments(live_prefix) == live_segments
        os.kill(live, 0)  # still running
    finally:
        for pid, _ in held:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holders.kill()
        holders.communicate()


def _tiny_config(folder: Path, data: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "yamls" / "tiny.yaml").read_text())
    cfg["model"].update(d_model=32, n_layer=2, layer_pattern="M*", d_intermediate=0,
                        ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16}, attn_cfg={"num_heads": 2})
    cfg["data"].update(local=str(data), seq_len=SEQ_LEN, global_batch_size=2, micro_batch_size=2,
                       eval_batch_size=2, eval_split=None, num_canonical_nodes=1)
    cfg["variables"].update(seq_len=SEQ_LEN, run_name=folder.name)
    cfg.update(max_duration="3ba", save_folder=str(folder / "ck"), save_interval="1000ba", export_folder=None,
               sample=None, progress_bar=False, loggers={}, eval_interval="1000ba")
    cfg["scheduler"]["warmup"] = "0ba"
    folder.mkdir()
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(600)
def test_two_trainings_started_at_the_same_instant(tmp_path: Path) -> None:
    """Two `composer -n 1` trainings on one machine, on one freshly prepared (compressed) dataset,
    registering their shared memory at the same moment: both train."""
    data = _prepare(tmp_path, "train")
    env = _env(tmp_path, "register", 2)
    configs = [_tiny_config(tmp_path / f"run{i}", data) for i in range(2)]
    train = str(ROOT / "mamba" / "train.py")
    _run_all([[COMPOSER, "-n", "1", train, str(c)] for c in configs], env, tmp_path, timeout=540)
    for config in configs:
        curve = json.loads((config.parent / "ck" / "loss_curve.json").read_text())
        assert len(curve["loss"]) == 3 and all(math.isfinite(x) for x in curve["loss"]), curve
    assert len(os.listdir(env["MEET_DIR"])) == 2
