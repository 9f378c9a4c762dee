# aftrec: `make demo` shows the product end to end on ML-100K (DEMO_DATASET=ml-1m for ML-1M),
# `make test` runs lint and the test suite. Both create .venv on first use. PYTHON must be
# Python 3.11 or newer.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATASET ?= ml-100k

.PHONY: install demo test test-slow lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# prepare, train five models to early stopping, compare, serve; resumes if cut short
demo: $(BIN)/.installed
	$(BIN)/aftrec demo --dataset $(DEMO_DATASET)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) data runs build *.egg-info
