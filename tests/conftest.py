import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Whole training runs in subprocesses (composer launches, several in one test) get longer than the
# suite-wide per-test timeout in pyproject.toml; a test's own @pytest.mark.timeout wins.
SLOW_FILES = {"test_train.py": 900, "test_finetune.py": 900, "test_slurm.py": 900}


def pytest_collection_modifyitems(config, items):
    for item in items:
        limit = SLOW_FILES.get(item.path.name)
        if limit and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
