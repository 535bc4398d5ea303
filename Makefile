# Everything runs inside .venv; `make demo` and `make test` set it up on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
TESTS  ?= tests

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -c "from kernels.selective_scan import build_library; build_library(verbose=True)" \
		|| echo "note: no C compiler; the Mamba-1 scan will use the slower torch path"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(BIN)/python -m mamba.demo

test: setup
	$(BIN)/python -m pytest -q $(TESTS)

lint: setup
	$(BIN)/ruff check kernels mamba data neuron tests bench

bench: setup
	$(BIN)/python bench/bench_kernels.py
	$(BIN)/python bench/bench_train_step.py

clean:
	rm -rf $(VENV) kernels/_build runs .pytest_cache
