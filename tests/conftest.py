import os
import sys
from pathlib import Path

# Every process that imports torch._inductor (torch-xla does, so the neuron processes and, in this
# venv, each `composer` launcher) starts Inductor's pool of compile workers at import, each a fresh
# Python that imports torch: ~4 s of CPU per pool, 25 pools in a run of this suite, and nothing here
# compiles with Inductor (a pool is still made on first use). Set before torch; children inherit it.
os.environ.setdefault("TORCH_WARM_POOL", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Whole training runs in subprocesses (composer launches, several in one test) get longer than the
# suite-wide per-test timeout in pyproject.toml; a test's own @pytest.mark.timeout wins. test_slurm.py's
# first test also waits for the fixture that runs all of its jobs.
SLOW_FILES = {"test_train.py": 900, "test_finetune.py": 900, "test_slurm.py": 1200}

# `pytest -m "not slow"` leaves these out: each launches whole trainings (or starts a Slurm cluster:
# every test using the `cluster` fixture), tens of seconds or more on 2 cores. `make test` runs all.
# Listed here, by file and function, so the test files need no edits; a test may also carry
# @pytest.mark.slow itself.
SLOW_TESTS = {
    "test_train.py": {"test_training_lowers_the_loss_and_reports_eval_metrics",
                      "test_two_ranks_match_one_process",
                      "test_kill_9_then_autoresume_is_bit_identical"},
    "test_train_check.py": {"test_no_config_argument_trains_the_embedded_default_and_names_it"},
    "test_train_resume.py": {"test_two_nodes_share_a_save_folder_and_autoresume"},
    "test_data_concurrency.py": {"test_two_jobs_of_two_ranks_started_at_the_same_instant",
                                 "test_two_trainings_started_at_the_same_instant"},
    "test_finetune.py": {"test_answer_only_finetune_raises_held_out_exact_match"},
    "test_neuron_train.py": {"test_tiny_default_trains_checkpoints_and_resumes_bit_identically",
                             "test_zero1_steps_equal_adamw_steps"},
    "test_neuron_parallel.py": {"test_tp2_under_nxd_equals_the_plain_model",
                                "test_tp2_training_run_resumes_bit_identically"},
    "test_triton_kernels.py": {"test_in_fresh_process"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        limit = SLOW_FILES.get(item.path.name)
        if limit and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
        name = getattr(item, "originalname", item.name)
        if name in SLOW_TESTS.get(item.path.name, ()) or "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The bundled corpus prepared at seq_len 64 (2% validation), shared by the training tests."""
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare(inputs=[str(ROOT / "data" / "corpus" / "tiny_corpus.jsonl")], output=str(out), seq_len=64,
            val_ratio=0.02, progress=False)
    return out
