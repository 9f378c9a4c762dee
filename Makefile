# aftrec: `make demo` runs the main job on ML-1M, `make test` runs the test suite.
# Both create .venv on first use. PYTHON must be Python 3.11 or newer.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO_RUNS := runs/demo
DEMO_EPOCHS ?= 6

.PHONY: install demo test test-slow lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

data/ml-1m/meta.json: | $(BIN)/.installed
	$(BIN)/aftrec prepare --dataset ml-1m --out data/ml-1m --force

demo: $(BIN)/.installed data/ml-1m/meta.json
	rm -rf $(DEMO_RUNS)
	$(BIN)/aftrec train --data data/ml-1m --model pop --out $(DEMO_RUNS)/pop --quiet
	$(BIN)/aftrec train --data data/ml-1m --model two-tower --out $(DEMO_RUNS)/two-tower --set train.epochs=$(DEMO_EPOCHS)
	$(BIN)/aftrec evaluate --run $(DEMO_RUNS)/pop --quiet
	$(BIN)/aftrec evaluate --run $(DEMO_RUNS)/two-tower --quiet

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
