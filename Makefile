# seedbatch: the verbs a newcomer types. `make` alone lists them.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# A path entry (.pth) rather than setuptools' default import hook: other projects' type checkers (mypy,
# pyright) follow .pth paths but not import hooks, so they see the package and its py.typed.
EDITABLE := --config-settings editable_mode=compat

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-llm test-ray bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11+); set PY=python3.x"; exit 2; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(EDITABLE) -e '.[dev]'
	$(BIN)/python -m compileall -q pipeline  # as a non-editable install does: start-up reads bytecode
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install seedbatch with its dev tools

demo: $(STAMP)  ## run jobs/demo.toml against the built-in local API (no key needed)
	$(BIN)/seedbatch run jobs/demo.toml
	$(BIN)/seedbatch show out/demo.parquet --rows 3

test: $(STAMP)  ## the fast suite (a few minutes on 2 cores)
	$(BIN)/pytest -q

test-slow: $(STAMP)  ## the slow tier: the kill test (12 SIGKILLs, then resume)
	$(BIN)/pytest -q -m slow

$(VENV)/.installed-llm: pyproject.toml $(STAMP)
	@echo "installing the llm extra; the first time builds llama.cpp from source (about 10 min on 2 cores)"
	$(BIN)/pip install --progress-bar off $(EDITABLE) -e '.[dev,llm]'
	@touch $@

test-llm: $(VENV)/.installed-llm  ## a real model: llama.cpp serving Gemma 3 270M (builds llama-cpp-python once)
	$(BIN)/pytest -q -m llm -p no:cacheprovider tests/test_llm.py

$(VENV)/.installed-ray: pyproject.toml $(STAMP)
	$(BIN)/pip install -q $(EDITABLE) -e '.[dev,ray]'
	@touch $@

test-ray: $(VENV)/.installed-ray  ## the Ray executor on a 3-node Ray cluster on 127.0.0.1, losing a node and the driver (installs the ray extra once)
	$(BIN)/pytest -q -m ray -p no:cacheprovider tests/test_ray.py

bench: $(VENV)/.installed-ray $(VENV)/.installed-llm  ## benchmarks against the local API, 2 Ray workers and a real model (llama.cpp); writes benchmarks/RESULTS.md
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check pipeline tests benchmarks data
	$(BIN)/mypy

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf out .pytest_cache .mypy_cache .ruff_cache benchmarks/out
