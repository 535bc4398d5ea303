"""streaming's shared-memory prefix, chosen safely when several jobs share one machine.

mosaicml-streaming 0.13 names a dataset's shared memory ``/dev/shm/NNNNNN_<what>``. Every local
rank scans for the first free ``NNNNNN`` and then the local leader creates ``NNNNNN_locals``; two
jobs starting together both find the same number free and the second dies with
``FileExistsError: '/000096_locals'`` (upstream issues 689, 884). Segments of a process killed
with SIGKILL stay behind for good.

Here the local leader scans and registers under an exclusive lock on a machine-wide file, and
records its process (pid, start time) beside the segments. The other local ranks of the same job
read the leader's choice from that record instead of scanning again, so a job starting between
their scans cannot make them disagree. Before scanning, the leader removes the segments of a
prefix whose recorded processes are all gone; a prefix with a live process, or one whose owner
cannot be judged (another pid namespace, another user's files), is never touched.

The lock and the records live where the segments do (``/dev/shm``), so their scope is exactly
that of the names they protect: one machine, or one Slurm node with a private ``/dev/shm``.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from tempfile import gettempdir

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN, TICK
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _check_self, _get_path, _pack_locals, _unpack_locals
from streaming.base.world import World
from torch import distributed as dist

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else gettempdir()
LOCK_NAME = "mamba-streaming.lock"
OWNER_PREFIX = "mamba-streaming."
OWNER_SUFFIX = ".owner"
LEADER_TIMEOUT = 120.0  # seconds a non-leader waits for its leader's record (behind a barrier already)

_registered = 0  # datasets this process has registered: all ranks of a job build them in one order


def _owner_path(prefix_int: int, pid: int) -> str:
    return os.path.join(SHM_DIR, f"{OWNER_PREFIX}{prefix_int:06}.{pid}{OWNER_SUFFIX}")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the original)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None, pid_namespace: str | None) -> bool | None:
    """True or False when known; None when this process cannot judge (another pid namespace)."""
    if pid_namespace != _pid_namespace():
        return None
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return False
        except OSError:
            return True  # exists, not ours to read
        if fields[0] in ("Z", "X"):  # exited, not yet reaped: its mappings are gone
            return False
        return start is None or int(fields[19]) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def machine_lock() -> Iterator[None]:
    """An exclusive lock shared by every process that sees this ``/dev/shm``."""
    path = os.path.join(SHM_DIR, LOCK_NAME)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _segment_exists(name: str) -> bool:
    if SHM_DIR == "/dev/shm":
        return os.path.exists(os.path.join(SHM_DIR, name))
    try:
        shm = SharedMemory(name, False, auto_cleanup=False)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    shm.shm.close()
    return True


def _unlink_segment(name: str) -> None:
    try:
        if SHM_DIR == "/dev/shm":
            os.unlink(os.path.join(SHM_DIR, name))
        else:
            from multiprocessing import shared_memory

            shared_memory._posixshmem.shm_unlink("/" + name)  # type: ignore[attr-defined]
    except (FileNotFoundError, PermissionError):
        pass


def _read_records() -> dict[int, list[tuple[str, dict]]]:
    """Owner records by prefix: [(path, record)]."""
    records: dict[int, list[tuple[str, dict]]] = {}
    for name in os.listdir(SHM_DIR):
        if not (name.startswith(OWNER_PREFIX) and name.endswith(OWNER_SUFFIX)):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            prefix_int = int(name[len(OWNER_PREFIX):].split(".")[0])
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # half written by a live writer, or not ours: leave it
        records.setdefault(prefix_int, []).append((path, record))
    return records


def clean_dead_segments() -> list[int]:
    """Remove the segments of each prefix whose recorded processes are all gone; returns the prefixes.

    Segments nobody recorded (an older streaming user) and those of a live process stay.
    Call it under :func:`machine_lock` so that nobody registers the prefix meanwhile.
    """
    cleaned = []
    for prefix_int, owners in sorted(_read_records().items()):
        alive = [process_alive(r.get("pid", -1), r.get("start"), r.get("pid_namespace")) for _, r in owners]
        if any(state is not False for state in alive):
            continue
        for shm_name in SHM_TO_CLEAN:
            _unlink_segment(_get_path(prefix_int, shm_name))
        for path, _ in owners:
            try:
                os.unlink(path)
            except OSError:
                pass
        cleaned.append(prefix_int)
    return cleaned


def _write_record(prefix_int: int, **fields: object) -> None:
    pid = os.getpid()
    record = {"pid": pid, "start": _start_time(pid), "pid_namespace": _pid_namespace(),
              "created": time.time(), **fields}
    path = _owner_path(prefix_int, pid)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _prefix_taken(prefix_int: int, recorded: set[int]) -> bool:
    if prefix_int in recorded:
        return True
    try:
        if any(os.path.exists(os.path.join(gettempdir(), _get_path(prefix_int, lock)))
               for lock in (BARRIER_FILELOCK, CACHE_FILELOCK)):
            return True  # streaming's own rule: a prefix whose file locks exist may be in use
    except PermissionError:
        return True
    return any(_segment_exists(_get_path(prefix_int, shm_name)) for shm_name in SHM_TO_CLEAN)


def _their_locals(prefix_int: int) -> list[str]:
    try:
        shm = SharedMemory(_get_path(prefix_int, LOCALS), False, auto_cleanup=False)
    except (FileNotFoundError, PermissionError):
        return []
    try:
        return _unpack_locals(bytes(shm.buf))[0]
    finally:
        shm.shm.close()


def _find_free_prefix(streams_local: list[str], streams_remote: list[str | None]) -> int:
    """The first prefix with no segment, file lock or record; refuse a local cache a live dataset
    with a remote uses (streaming's rule, its eviction would delete the other's shards)."""
    recorded = set(_read_records())
    for prefix_int in itertools.count():
        if not _prefix_taken(prefix_int, recorded):
            return prefix_int
        if any(streams_remote):
            theirs = set(_their_locals(prefix_int))
            reused = [local for local, remote in zip(streams_local, streams_remote, strict=True)
                      if remote is not None and local in theirs]
            if reused:
                raise ValueError(f"Reused local directory: {reused} is the cache of a running dataset "
                                 f"(shared memory prefix {prefix_int}). Provide a different one.")
    raise AssertionError("unreachable")


def _job_key() -> str:
    """The same string in every rank of one job, different between jobs running at once on a
    machine (they cannot share a rendezvous address and port)."""
    names = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "WORLD_SIZE")
    return ":".join(os.environ.get(name, "") for name in names)


def _leader_prefix(job: str, sequence: int, streams_local: list[str]) -> int:
    deadline = time.monotonic() + LEADER_TIMEOUT
    while True:
        matches = [(record.get("created", 0.0), prefix_int)
                   for prefix_int, owners in _read_records().items() for _, record in owners
                   if record.get("leader") and record.get("job") == job and record.get("sequence") == sequence
                   and record.get("locals") == streams_local]
        if matches:
            return max(matches)[1]  # the newest: an older one is a finished job that used the same port
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local leader registered no shared memory for {streams_local} within "
                               f"{LEADER_TIMEOUT:.0f} s (job {job!r}, dataset #{sequence}): see local rank 0")
        time.sleep(TICK)


def get_shm_prefix(streams_local: list[str], streams_remote: list[str | None], world: World,
                   retry: int = 100) -> tuple[int, SharedMemory]:
    """A drop-in for ``streaming.base.shared.prefix.get_shm_prefix`` (same barriers, same result)."""
    global _registered
    _check_self(streams_local)
    sequence, job = _registered, _job_key()
    _registered += 1

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

    if world.is_local_leader:
        # Retried: a dataset being deleted frees its locals a moment later, and a process that
        # does not take this lock (streaming used directly) may create the prefix we chose.
        errors: list[Exception] = []
        for _ in range(1 + retry):
            with machine_lock():
                clean_dead_segments()
                try:
                    prefix_int = _find_free_prefix(streams_local, streams_remote)
                    data = _pack_locals(streams_local, prefix_int)
                    shm = SharedMemory(_get_path(prefix_int, LOCALS), True, len(data))
                except (ValueError, FileExistsError) as err:
                    errors.append(err)
                else:
                    shm.buf[:len(data)] = data
                    _write_record(prefix_int, leader=True, job=job, sequence=sequence, locals=streams_local)
                    break
            time.sleep(TICK)
        else:
            raise errors[-1]

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

    if not world.is_local_leader:
        prefix_int = _leader_prefix(job, sequence, streams_local)
        shm = SharedMemory(_get_path(prefix_int, LOCALS), False)
        their_locals, their_prefix_int = _unpack_locals(bytes(shm.buf))
        if streams_local != their_locals or prefix_int != their_prefix_int:
            raise RuntimeError(f"shared memory prefix {prefix_int} holds {their_locals}, expected "
                               f"{streams_local}: did every rank get the same data.local?")
        _write_record(prefix_int, leader=False, job=job, sequence=sequence, locals=streams_local)
    return prefix_int, shm


def install() -> None:
    """Make every StreamingDataset built in this process choose its prefix here."""
    import streaming.base.dataset as streaming_dataset

    streaming_dataset.get_shm_prefix = get_shm_prefix

