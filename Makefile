# Two commands after `git clone`:  make demo   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-single test test-fast lint format install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build (2.13.0) in pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# a network of 3 synthetic hospitals (sites.yaml, made on first use): one backbone, one adapter per site
demo: $(STAMP)
	$(BIN)/cessl run --sites sites.yaml

# one hospital (data/), the single-site pipeline
demo-single: $(STAMP)
	$(BIN)/cessl run

# what CI runs (.ci/run): lint, then the whole suite (slow, Docker and server tests included)
test: lint
	$(BIN)/python -m pytest -q -ra --durations=15

# the inner loop: no slow, Docker or real-server test (< 3 minutes on 2 cores)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not docker and not integration" --durations=10

# ruff (lint + format check, config in pyproject.toml) and mypy on ml/, components/ and pipeline/
lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix
	$(BIN)/ruff format

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache mlruns mlflow.db
