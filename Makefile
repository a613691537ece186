# Scriptorium: `make run` and `make test` work from a fresh clone (they set up .venv on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

export SCRIPTORIUM_DATA ?= $(CURDIR)/data
export SCRIPTORIUM_PROFILE ?= demo
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
# MLflow 3 reports usage telemetry unless told not to (Dagster's is off in dagster.yaml).
export MLFLOW_DISABLE_TELEMETRY ?= true
MIRROR ?=
MIRROR_PORT ?= 8765
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000

.PHONY: setup run test lint ui bench bench-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

# With MIRROR=DIR, the project's mirror server serves DIR on loopback for the duration of the run.
run: setup
	@mkdir -p "$(SCRIPTORIUM_DATA)" "$(DAGSTER_HOME)"
	@if [ -n "$(MIRROR)" ]; then \
	  $(BIN)/scriptorium mirror serve "$(MIRROR)" --port $(MIRROR_PORT) & pid=$$!; \
	  trap "kill $$pid 2>/dev/null" EXIT; \
	  $(BIN)/scriptorium mirror wait --port $(MIRROR_PORT) || exit 1; \
	  export GUTENBERG_MIRROR=http://127.0.0.1:$(MIRROR_PORT); \
	  export HF_ENDPOINT=http://127.0.0.1:$(MIRROR_PORT); \
	  export SCRIPTORIUM_FILES_MIRROR=http://127.0.0.1:$(MIRROR_PORT)/files; \
	  $(BIN)/scriptorium run $(if $(VERBOSE),--verbose); \
	else \
	  $(BIN)/scriptorium run $(if $(VERBOSE),--verbose); \
	fi

test: setup
	$(BIN)/ruff check pipeline llm_core tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check pipeline llm_core tests benchmarks
	$(BIN)/ruff format --check pipeline llm_core tests benchmarks

# Dagster (`dagster dev`: webserver + daemon) and the MLflow UI on the store the pipeline writes to.
# An http(s) MLFLOW_TRACKING_URI is a server already running: linked, not started. The MLflow UI
# runs in the background (where Ctrl-C does not reach it), so the EXIT trap stops it with Dagster.
ui: setup
	@mkdir -p "$(SCRIPTORIUM_DATA)" "$(DAGSTER_HOME)"
	@store="$${MLFLOW_TRACKING_URI:-sqlite:///$(SCRIPTORIUM_DATA)/mlflow.db}"; \
	case "$$store" in \
	  http://*|https://*) mlflow_url="$$store" ;; \
	  *) $(BIN)/mlflow ui --backend-store-uri "$$store" --host 127.0.0.1 --port $(MLFLOW_PORT) & \
	     mlflow_pid=$$!; trap 'kill $$mlflow_pid 2>/dev/null' EXIT; \
	     mlflow_url="http://127.0.0.1:$(MLFLOW_PORT)" ;; \
	esac; \
	echo "Dagster UI: http://127.0.0.1:$(DAGSTER_PORT)"; \
	echo "MLflow UI:  $$mlflow_url   (tracking store: $$store)"; \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(DAGSTER_PORT)

# Full benchmark runs (manual, ~20-30 min on 2 cores; run them on a quiet machine): each prints
# its figures and, as its last line, one JSON object. BENCHMARKS.md gives the method and figures.
# `make bench-smoke` runs every script with tiny settings (seconds each) so none can rot;
# tests/benchmarks/test_smoke.py runs the same under `make test`.
BENCH_MIRROR ?= $(or $(MIRROR),$(SCRIPTORIUM_TEST_MIRROR),$(CURDIR)/../shared/mirror)

bench: setup
	$(BIN)/python benchmarks/data_stages.py --mirror "$(BENCH_MIRROR)"
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/sft_packing.py --mirror "$(BENCH_MIRROR)"
	$(BIN)/python benchmarks/serve.py --weights "$(SCRIPTORIUM_DATA)/rlhf_weights"

bench-smoke: setup
	$(BIN)/python benchmarks/data_stages.py --smoke --mirror "$(BENCH_MIRROR)"
	$(BIN)/python benchmarks/train_throughput.py --smoke
	$(BIN)/python benchmarks/sft_packing.py --smoke --mirror "$(BENCH_MIRROR)"
	$(BIN)/python benchmarks/serve.py --smoke

clean:
	rm -rf data .pytest_cache .ruff_cache
