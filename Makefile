# Set-up on a fresh machine is `make test` or `make bench`: each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
STAMP := $(VENV)/.pyconv-deps
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all build test bench bench-quick lint format gpu-check clean

all: build

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "$(TORCH)" -r requirements-dev.txt
	PYCONV_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental: ninja rebuilds only what changed.
build: $(STAMP)
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m pyconv.bench --json benchmarks/results/bench_cpu.json

bench-quick: build
	$(PY) -m pyconv.bench --quick

CSRC = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

lint: $(STAMP)
	$(PY) -m ruff check pyconv tests benchmarks scripts setup.py
	$(PY) -m ruff format --check pyconv tests benchmarks scripts setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(CSRC)

format: $(STAMP)
	$(PY) -m ruff format pyconv tests benchmarks scripts setup.py
	$(PY) -m ruff check --fix pyconv tests benchmarks scripts setup.py
	$(VENV)/bin/clang-format -i $(CSRC)

# On a machine with a GPU and torch already installed (no network): build, CUDA tests, CUDA
# benchmarks; logs and JSON go to $$OUT when it is set.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build pyconv/_C*.so pyconv/*.egg-info *.egg-info
