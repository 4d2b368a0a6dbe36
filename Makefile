# Two entry points for a fresh machine: `make demo` (set up + run the demo) and `make test`.
PYTHON ?= python3
# CPU build on this project's machines; set TORCH="torch" (or a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint protos bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so nothing else pulls a multi-GB CUDA build in its place.
	$(BIN)/pip install -q "$(TORCH)"
	# milvus-lite (the Milvus tests' engine) brings faiss-cpu: with the cpu build only.
	$(BIN)/pip install -q -e ".[cpu,dev,milvus-lite]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/recsys demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

protos: $(VENV)/.installed
	$(BIN)/python -m recsys.app.codegen

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.build_bench
	$(BIN)/python -m benchmarks.serving_bench
