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

LOCK := requirements.lock
# Every extra the tests or the launchers use; `make lock` resolves them all together.
LOCK_EXTRAS := test,lmms,slurm,ray
LOCK_VENV := .venv-lock

.PHONY: help setup lock test test-fast browser-test bench sweep leaderboard overlays report perf gpu-check lint train-embedded clean-venv

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

setup: $(STAMP)  ## create .venv from requirements.lock (hash-checked), then prunebench itself

# The lock holds every distribution (torch and torchvision included, pinned together), so pip resolves
# nothing: hash-checking mode installs exactly those files, then prunebench without dependencies.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m benchmarks.lockfile check
	@touch $(STAMP)

# Re-resolve pyproject.toml (all extras) in a scratch venv, run the fast tests there against the new
# lock, and only then replace requirements.lock: an upgrade is one reviewable commit of both files.
lock:  ## re-resolve pyproject.toml into requirements.lock (scratch venv, fast tests first)
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade --report $(LOCK_VENV)/report.json \
		pip 'setuptools>=77' -e '.[$(LOCK_EXTRAS)]'
	$(LOCK_VENV)/bin/python -m benchmarks.lockfile write $(LOCK_VENV)/report.json \
		--extras $(LOCK_EXTRAS) --out $(LOCK_VENV)/requirements.lock
	PRUNEBENCH_LOCK=$(LOCK_VENV)/requirements.lock $(LOCK_VENV)/bin/python -m pytest -q -m "not slow" tests
	cp $(LOCK_VENV)/requirements.lock $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "requirements.lock rewritten: review 'git diff $(LOCK)', run 'make test', commit it with pyproject.toml"

test: setup  ## run the whole test suite (CPU only, no downloads; the browser test is `make browser-test`)
	$(PY) -m pytest -q -m "not browser" tests

test-fast: setup  ## the tests not marked slow
	$(PY) -m pytest -q -m "not slow and not browser" tests

# The report's browser test needs Debian's chromium and chromium-driver (system packages, not PyPI):
# installed here when missing (root, or sudo), never from inside pytest.
browser-test: setup  ## the HTML report in headless Chromium via Selenium (installs chromium if missing)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; fi
	$(PY) -m pytest -q -m browser tests/browser

# leaderboard=true: the runner writes the leaderboard at the end, in the same process (no second start-up).
bench: setup  ## one benchmark: METHOD=fastv MODEL=embedded TASK=shapes BUDGETS=... N=200
	$(PY) -m benchmarks.run method=$(METHOD) model=$(MODEL) task=$(TASK) budgets='$(BUDGETS)' n_samples=$(N) results_dir=$(RESULTS) leaderboard=true $(ARGS)

sweep: setup  ## every registered method over BUDGETS
	$(PY) -m benchmarks.run --multirun method=$(shell $(PY) -c "from pruners import available_pruners as a; print(','.join(n for n in a() if n != 'none'))") model=$(MODEL) task=$(TASK) budgets='$(BUDGETS)' n_samples=$(N) results_dir=$(RESULTS) $(ARGS)
	$(PY) -m benchmarks.leaderboard results_dir=$(RESULTS)

leaderboard: setup  ## aggregate results/ into leaderboard.csv, auc.csv, plots/
	$(PY) -m benchmarks.leaderboard results_dir=$(RESULTS)

overlays: setup  ## kept-token overlays of chosen samples of RESULTS (ARGS=samples=N, ids=[...], out=DIR)
	$(PY) -m benchmarks.visualize results_dir=$(RESULTS) $(ARGS)

report: setup  ## static HTML report of RESULTS: RESULTS/report/index.html (table, plots, overlays, configs)
	$(PY) -m benchmarks.report results_dir=$(RESULTS) $(ARGS)

perf: setup  ## speed and memory tables (ARGS=--help for the options)
	$(PY) -m benchmarks.perf $(ARGS)

gpu-check: setup  ## on a CUDA machine: Triton kernels compiled vs references, CUDA perf, suite (one report)
	$(PY) -m benchmarks.gpu_check $(ARGS)

lint: setup  ## ruff over the code and tests
	$(PY) -m ruff check pruners mllm_adapters benchmarks tests

train-embedded: setup  ## train the embedded model again (hours of CPU; resumes)
	$(PY) -m benchmarks.embedded.recipe $(ARGS)

clean-venv:  ## delete .venv
	rm -rf $(VENV)
