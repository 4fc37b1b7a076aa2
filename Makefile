# ONNX-optimized CPU inference for Hugging Face text classifiers. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# export
MODEL ?=
NAME ?=
OUTPUT_DIR ?=
EXPORT_ARGS ?=
# serve (MODEL_DIR: a model folder, or a repository of them such as onnx_models; docs/serving.md#several-models)
MODEL_DIR ?= onnx_models/minilm-l6-sentiment
DEFAULT_MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
THREADS ?=
ORT_THREADS ?=
# test
PYTEST_ARGS ?=
# bench (python -m bench --help, python -m bench.cores --help)
BENCH_ARGS ?=
CORES_ARGS ?=
# image (python3 deploy/image.py --help; docs/deployment.md)
IMAGE ?= onnx-classifier:latest
BASE ?= python:3.11-slim

.DEFAULT_GOAL := help
.PHONY: help install install-dev export serve test test-slow lint bench wrk image clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.serve-installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.serve-installed

install: $(VENV)/.serve-installed ## Install what serving needs (no torch) into .venv

install-dev: $(VENV)/.dev-installed ## Install export and test dependencies (torch CPU, optimum) into .venv

export: $(VENV)/.dev-installed ## Export MODEL (hub id or local folder; default: train the offline sentiment model) to OUTPUT_DIR/NAME (default onnx_models/NAME)
	$(BIN)/python -m export $(if $(MODEL),--model "$(MODEL)") $(if $(NAME),--name "$(NAME)") \
	$(if $(OUTPUT_DIR),--output-dir "$(OUTPUT_DIR)") $(EXPORT_ARGS)

serve: $(VENV)/.serve-installed ## Serve MODEL_DIR (a model folder or a repository; DEFAULT_MODEL) on HOST:PORT (THREADS, ORT_THREADS optional)
	SERVICE_MODEL_DIR="$(MODEL_DIR)" SERVICE_HOST="$(HOST)" SERVICE_PORT="$(PORT)" \
	$(if $(DEFAULT_MODEL),SERVICE_DEFAULT_MODEL="$(DEFAULT_MODEL)") \
	$(if $(THREADS),SERVICE_THREADS="$(THREADS)") $(if $(ORT_THREADS),SERVICE_ORT_THREADS="$(ORT_THREADS)") \
	$(BIN)/python -m service

# wrk (a Debian package) is the load generator of the benchmark and of its tests.
wrk:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

test: lint wrk ## Lint, then run the default tier: every test not marked slow (installs wrk if missing)
	$(BIN)/python -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

test-slow: $(VENV)/.dev-installed wrk ## Run the slow tier: retraining the default model, image builds, the soak, the thorough fuzz
	$(BIN)/python -m pytest -m slow --durations=10 $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed ## ruff check (settings in pyproject.toml)
	$(BIN)/ruff check .

bench: $(VENV)/.dev-installed wrk ## Benchmark against the peers, the HTTP floor and the in-process limit, then by cores (<= 15 min; docs/benchmarks.md)
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.cores $(CORES_ARGS)

image: ## Build the container image IMAGE on BASE (if BASE cannot be pulled: a Debian base made with debootstrap)
	$(PYTHON) deploy/image.py --image "$(IMAGE)" --base "$(BASE)"

clean: ## Remove the virtualenv and caches (keeps .cache downloads and checkpoints)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
