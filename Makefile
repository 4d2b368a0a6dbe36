# Two entry points for a fresh machine: `make demo` (set up + run the demo) and `make test`.
# Everything installs through requirements/lock.txt (`make lock` refreshes it; README).
PYTHON ?= python3
LOCK := requirements/lock.txt
# The CPU build on this project's machines (pip's configuration finds its wheel); on a GPU machine
# set TORCH to a CUDA build of the same version (README, "Development").
TORCH ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
VENV := .venv
BIN := $(VENV)/bin
# uv resolves the lock; it runs from its own environment, so `make lock` works even when the
# project's environment cannot be installed from the old lock.
UV_VERSION := 0.13.9
LOCK_TOOLS := .venv-lock

.PHONY: setup demo test lint lock protos bench

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	# torch first, so nothing else pulls a multi-GB CUDA build in its place.
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH)"
	# milvus-lite (the Milvus tests' engine) brings faiss-cpu: with the cpu build only.
	$(BIN)/pip install -q -c $(LOCK) -e ".[cpu,dev,milvus-lite]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/recsys demo

lint: $(VENV)/.installed
	$(BIN)/python requirements/lock.py check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

$(LOCK_TOOLS)/bin/uv:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

# Newest releases the inputs allow; `make lock KEEP=1` only adds what new inputs need.
lock: $(LOCK_TOOLS)/bin/uv
	$(PYTHON) requirements/lock.py refresh --uv $(LOCK_TOOLS)/bin/uv $(if $(KEEP),--keep)

protos: $(VENV)/.installed
	$(BIN)/python -m recsys.app.codegen

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.build_bench
	$(BIN)/python -m benchmarks.serving_bench
