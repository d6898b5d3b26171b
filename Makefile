# Development set-up: a local virtual environment with torch pinned to the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test check lint bench bench-targets clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/bnprobe demo

lint: setup
	$(BIN)/ruff check bnprobe tests examples benchmarks tools docs/*.py
	$(BIN)/ruff format --check bnprobe tests examples benchmarks tools docs/*.py
	$(BIN)/mypy

# The whole suite, two test files at a time (tests are independent; each uses its own tmp_path;
# --dist loadfile keeps a module on one worker, so its module-scoped fixture runs once).
test: lint
	$(BIN)/pytest -n 2 --dist loadfile

# ruff, mypy and the fast half of the suite: before every commit.
check: lint
	$(BIN)/pytest -n 2 --dist loadfile -m "not slow"

# Every configuration (results.md), then the targets of docs/performance.md (results_targets.md:
# PASS/FAIL per target, CPU time against no probe, with the A/A control). Run on a quiet machine.
bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/overhead.py --targets

bench-targets: setup
	$(BIN)/python benchmarks/overhead.py --targets

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache lightning_logs bnprobe_demo
