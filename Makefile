# Two entry points, each does its own setup on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test lint bench

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m pfc_ds.train.distributed  # DeepSpeed's CPU comm op and the head's CPU kernels, compiled once per venv
	touch $@

train: $(BIN)/.installed
	./train.sh configs/demo_cpu.yaml

test: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/python -m pfc_ds.bench.head
