# prunebench: `make bench` and `make test` are all a fresh clone needs (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunebench-installed

METHOD ?= fastv
MODEL ?= embedded
TASK ?= shapes
BUDGETS ?= [null,72,36,18]
N ?= 200
RESULTS ?= results
ARGS ?=

.PHONY: setup test test-fast bench sweep leaderboard perf lint train-embedded clean-venv

setup: $(STAMP)

# torch and torchvision are pinned together and installed first so pip never resolves a second torch.
# lmms-eval pins antlr4 4.7.2 (through latex2sympy2) but Hydra needs 4.9.*: re-pin it afterwards.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,lmms]'
	$(PY) -m pip install -q antlr4-python3-runtime==4.9.3
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.run method=$(METHOD) model=$(MODEL) task=$(TASK) budgets='$(BUDGETS)' n_samples=$(N) results_dir=$(RESULTS) $(ARGS)
	$(PY) -m benchmarks.leaderboard results_dir=$(RESULTS)

sweep: setup
	$(PY) -m benchmarks.run --multirun method=$(shell $(PY) -c "from pruners import available_pruners as a; print(','.join(n for n in a() if n != 'none'))") model=$(MODEL) task=$(TASK) budgets='$(BUDGETS)' n_samples=$(N) results_dir=$(RESULTS) $(ARGS)
	$(PY) -m benchmarks.leaderboard results_dir=$(RESULTS)

leaderboard: setup
	$(PY) -m benchmarks.leaderboard results_dir=$(RESULTS)

perf: setup
	$(PY) -m benchmarks.perf $(ARGS)

lint: setup
	$(PY) -m ruff check pruners mllm_adapters benchmarks tests

train-embedded: setup
	$(PY) -m benchmarks.embedded.recipe $(ARGS)

clean-venv:
	rm -rf $(VENV)
