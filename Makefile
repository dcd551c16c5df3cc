# factoryfed: `make run` (the main job) and `make test` set up .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-factoryfed
ARGS ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test test-slow test-all lint bench clean images

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments.run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_dp

# Container images factoryfed-factory and factoryfed-operator (podman or docker); makes a
# Debian base with debootstrap where no registry answers. See docker/README.md.
images:
	bash docker/build-images.sh

clean:
	rm -rf outputs multirun mlartifacts mlflow.db .pytest_cache
