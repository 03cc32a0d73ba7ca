# raserec developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data

.PHONY: help install test lint bench clean results-table

help:  ## list every target
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install:  ## create .venv, install torch==2.13.0 (CPU) first, then raserec[dev] in editable mode
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

test:  ## run the whole test suite (uses ../shared/data in place)
	$(BIN)/python -m pytest -q tests

lint:  ## ruff check
	$(BIN)/ruff check raserec tests

bench:  ## run the benchmarks, writing results/*_bench.json
	$(BIN)/python -m raserec.benchmarks.data_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.train_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.memory_bench --data $(DATA) --torch-threads 1

results-table:  ## regenerate the README results table from results/*.json
	$(BIN)/python -m raserec.results_table --write README.md

clean:  ## remove caches and run outputs (not .venv)
	rm -rf .pytest_cache .ruff_cache runs lightning_logs wandb .cache
