"""CPU threads for training: OpenMP's passive wait policy takes effect (idle workers sleep instead
of spinning, which on a busy machine made steps several times slower), a user's own setting
wins, and the thread count follows the CPUs the process may actually use."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# CPU time the process burns while its main thread sleeps between small parallel ops: OpenMP
# workers waiting for work. Measured in a fresh process (OpenMP reads its environment once).
PROBE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import mamba.train as recipe  # must come before torch: it sets the wait policy
import torch
torch.set_num_threads(2)
a = torch.randn(384, 384)
cpu = wall = 0.0
for _ in range(40):
    a @ a
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(0.005)
    cpu += time.process_time() - c0
    wall += time.perf_counter() - t0
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "idle_cpu": cpu / wall}}))
"""


def probe(**env_over):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_over)
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs for an OpenMP worker")
def test_recipe_sets_a_passive_wait_policy_that_takes_effect_and_a_users_wins():
    # A spinning worker shows as CPU time while the main thread sleeps; a passive one does not. Timing
    # on a shared machine is noisy: the policies must separate clearly in one of three side-by-side tries.
    tries = []
    for _ in range(3):
        passive = probe()
        assert passive["policy"] == "PASSIVE"
        active = probe(OMP_WAIT_POLICY="ACTIVE")  # the user's setting is kept
        assert active["policy"] == "ACTIVE"
        tries.append((passive["idle_cpu"], active["idle_cpu"]))
        if passive["idle_cpu"] < 0.1 and active["idle_cpu"] > max(0.1, 3 * passive["idle_cpu"]):
            return
    pytest.fail(f"idle CPU (passive, active) per try: {tries}")


THREADS = """
import os, sys
sys.path.insert(0, {root!r})
os.sched_setaffinity(0, {cpus})
from mamba.train import available_cpus, configure_cpu_threads
print(available_cpus(), configure_cpu_threads())
"""


@pytest.mark.parametrize("cpus,env,expected", [
    ({0}, {}, "1 1"),  # taskset -c 0: one thread, whatever os.cpu_count() says
    ({0, 1}, {"LOCAL_WORLD_SIZE": "2"}, "2 1"),  # two ranks share two CPUs
    ({0, 1}, {"OMP_NUM_THREADS": "1"}, "2 1"),  # the user's OMP_NUM_THREADS wins
])
def test_threads_follow_the_cpus_this_process_may_use(cpus, env, expected):
    if not cpus <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", THREADS.format(root=str(ROOT), cpus=cpus)],
                         capture_output=True, text=True, env={**full, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == expected.split()


def test_large_frees_go_back_to_the_os_only_for_large_models(monkeypatch):
    from mamba.train import MMAP_FREES_MIN_PARAMS, mmap_frees_wanted

    monkeypatch.delenv("MAMBA_CPU_MMAP_FREES", raising=False)
    assert not mmap_frees_wanted(1_000_000)  # tiny.yaml: the per-allocation mmap costs more than it saves
    assert mmap_frees_wanted(MMAP_FREES_MIN_PARAMS)
    monkeypatch.setenv("MAMBA_CPU_MMAP_FREES", "1")
    assert mmap_frees_wanted(1_000_000)
    monkeypatch.setenv("MAMBA_CPU_MMAP_FREES", "0")
    assert not mmap_frees_wanted(10**9)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux's /proc/cpuinfo")
def test_composers_cpu_model_query_is_answered_without_a_py_cpuinfo_process(monkeypatch):
    """Composer's Trainer asks py-cpuinfo for the CPU model, which starts a new Python process in
    every rank; the recipe answers Composer's cached query from /proc/cpuinfo first."""
    import cpuinfo
    from composer.utils import collect_env

    from mamba.train import name_the_cpu_for_composer

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if not names:
        pytest.skip("no model name in /proc/cpuinfo: Composer asks py-cpuinfo, as before")
    collect_env.get_cpu_model.cache_clear()  # a Trainer built earlier in this process filled it

    def no_process():
        raise AssertionError("py-cpuinfo was asked (it starts a Python process)")

    try:
        name_the_cpu_for_composer()
        monkeypatch.setattr(cpuinfo, "get_cpu_info", no_process)
        assert collect_env.get_cpu_model() == names[0]
    finally:
        collect_env.get_cpu_model.cache_clear()
