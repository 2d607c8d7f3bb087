# Two commands after `git clone`:  make demo   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# the suite starts many Python processes: let them reuse the byte-compiled project and tests
# (where the environment sets PYTHONDONTWRITEBYTECODE, every process compiles them again)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo demo-single test prebuild test-fast test-integration test-e2e lint format install clean

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

# what CI runs (.ci/run): every tier in one session on two workers (pytest-xdist; tests/conftest.py
# keeps a file on one worker, the e2e tier on one, the long tiers first) and, beside it, lint
# (mypy from a cold cache is a minute on one core: it runs while the workers start, its report
# is printed after the tests'); fails if either fails
PYTEST := $(BIN)/python -m pytest -q -ra
WORKERS ?= 2
LINT_LOG := .cache/lint.log
test: prebuild $(STAMP)
	@mkdir -p $(dir $(LINT_LOG))
	@$(MAKE) --no-print-directory lint >$(LINT_LOG) 2>&1 & lint=$$!; \
	$(PYTEST) -n $(WORKERS) --durations=30 tests/unit tests/integration tests/e2e; tests=$$?; \
	wait $$lint; linted=$$?; \
	echo "---- lint (ruff check, ruff format --check, mypy): exit $$linted"; cat $(LINT_LOG); \
	test $$tests -eq 0 && test $$linted -eq 0

# the e2e tier's image, built in the background while the install and the workers start
# (scripts/docker_engine.sh; a cache warmer: where it cannot run, the e2e fixture builds)
prebuild:
	@bash scripts/docker_engine.sh prebuild-background || true

# the inner loop: the unit tier (no server, no subprocess pipeline, no Docker; < 2 minutes)
test-fast: $(STAMP)
	$(PYTEST) -n $(WORKERS) --durations=10 tests/unit

# real MLflow / S3 / auth servers, kfp.local runs, real processes
test-integration: $(STAMP)
	$(PYTEST) -n $(WORKERS) --durations=15 tests/integration

# Docker images, TrainJobs, the demo against real servers (starts its own Docker engine)
test-e2e: $(STAMP)
	$(PYTEST) --durations=15 tests/e2e

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
