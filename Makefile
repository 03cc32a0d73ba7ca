# raserec developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data

DATASET ?= beauty
BACKBONE ?= sasrec
SEEDS ?= 2024 2025 2026 2027 2028
SCHEDULE ?= paper
TEST_WORKERS ?= auto
EXPERIMENT := $(DATASET)$(if $(filter sasrec,$(BACKBONE)),,_$(BACKBONE))_raserec

.PHONY: help install test lint bench bench-peer clean results-table reproduce

help:  ## list every target
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install:  ## create .venv, install torch==2.13.0 (CPU) first, then raserec[dev,semantic] in editable mode
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,semantic]'

test:  ## run the whole test suite (uses ../shared/data in place), one pytest-xdist worker per core
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint:  ## ruff check
	$(BIN)/ruff check raserec tests

bench:  ## run the benchmarks, writing results/*_bench.json
	$(BIN)/python -m raserec.benchmarks.data_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.train_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.step_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.memory_bench --data $(DATA) --torch-threads 1
	$(BIN)/python -m raserec.benchmarks.ce_bench
	$(BIN)/python -m raserec.benchmarks.ada_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.semantic_bench --data $(DATA)
	$(BIN)/python -m raserec.benchmarks.hae_bench --data $(DATA)

reproduce:  ## pre-train -> RAFT -> test over SEEDS for DATASET (beauty|sports|clothing), BACKBONE (sasrec|gru4rec|bert4rec); SCHEDULE=cpu_short for 3 epochs/stage; resumable
	$(BIN)/raserec experiment --name $(EXPERIMENT) --pretrain configs/stage/pretrain.yaml --finetune configs/stage/raft.yaml \
		--data configs/data/$(DATASET).yaml --model configs/model/$(BACKBONE).yaml --seeds $(SEEDS) $(if $(filter cpu_short,$(SCHEDULE)),--overlay configs/cpu_short.yaml,)

PEER_VENV ?= .venv-peer
bench-peer:  ## RecBole 1.2.1 (own venv .venv-peer) timed right before ours -> results/peer_bench.json; not in make test
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/pip install --quiet numpy==1.26.4 pandas==2.1.4 scipy scikit-learn colorlog==4.7.2 \
		colorama==0.4.4 pyyaml tqdm texttable tabulate tensorboard psutil thop plotly
	$(PEER_VENV)/bin/pip install --quiet --no-deps recbole==1.2.1  # its ray pin is only for hyper-parameter search
	$(BIN)/python -m raserec.benchmarks.peer_bench --data $(DATA) --peer-python $(PEER_VENV)/bin/python

results-table:  ## regenerate the README results table from results/*.json
	$(BIN)/python -m raserec.results_table --write README.md

clean:  ## remove caches and run outputs (not .venv)
	rm -rf .pytest_cache .ruff_cache runs lightning_logs wandb .cache
