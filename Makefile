# Everything runs inside .venv; `make demo` and `make test` set it up on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt neuron/requirements-cpu-test.txt | cksum | cut -d' ' -f1)
TESTS  ?= tests

.PHONY: setup demo test lint bench clean slurm-start slurm-stop slurm-status

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads took the CPU
# from the ones doing the work (bench/bench_threads.py). Set OMP_WAIT_POLICY yourself to override.
demo test: export OMP_WAIT_POLICY ?= PASSIVE

setup: $(STAMP)

$(STAMP): requirements.txt neuron/requirements-cpu-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	test ! -d ../shared/wheels || $(BIN)/python -m pip install --no-deps -r neuron/requirements-cpu-test.txt
	$(BIN)/python -c "from kernels.cbuild import build_all; build_all(verbose=True)" \
		|| echo "note: no C compiler; the Mamba-1 scan and decoding will use the slower torch paths"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: prepare the bundled corpus, train yamls/tiny.yaml on CPU, print a sample.
demo: setup
	test -f runs/data/tiny/train/index.json || $(BIN)/python -m data.prepare \
		--input data/corpus/tiny_corpus.jsonl --output runs/data/tiny --seq-len 256 --overwrite
	$(BIN)/composer -n 1 mamba/train.py yamls/tiny.yaml

test: setup
	$(BIN)/python -m pytest -q $(TESTS)

lint: setup
	$(BIN)/ruff check kernels mamba data $(wildcard neuron) tests bench

bench: setup
	$(BIN)/python bench/bench_kernels.py
	$(BIN)/python bench/bench_train_step.py
	$(BIN)/python bench/bench_recipe.py

# A one-machine Slurm (root; apt-get install slurm-wlm munge) to try `sbatch slurm.sh` on:
# README "Running a local Slurm". The stop ends only the daemons the start began.
slurm-start slurm-stop slurm-status:
	tests/slurm/cluster.sh $(@:slurm-%=%)

clean:
	rm -rf $(VENV) kernels/_build runs .pytest_cache
