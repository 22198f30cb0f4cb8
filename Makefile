# Everyday commands. `make demo` and `make test` work from a fresh clone: they create
# .venv, install the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA
# build), then the package with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint typecheck bench evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meterwatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check stream model tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy stream model

evaluate: $(STAMP)
	$(BIN)/meterwatch evaluate --data ../shared/data/lcl-2013-sample --out benchmarks/evaluation

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
