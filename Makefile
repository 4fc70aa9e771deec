# latentmoe — `make run` serves the embedded default model, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= checkpoints/mini
PORT ?= 50051

.PHONY: venv run test lint bench checkpoint proto clean

venv: $(STAMP)

# One install step for everything: the CPU torch wheel first (a looser pin would pull a CUDA build), then the
# project (which compiles protos/ into the latentmoe.v1 package) with its pinned dependencies.
$(STAMP): pyproject.toml setup.py $(wildcard protos/latentmoe/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 setuptools==84.2.1 grpcio-tools==1.85.1
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
	touch $(STAMP)

proto: venv
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/latentmoe init-checkpoint --preset mini --out $(MODEL)

checkpoint: $(MODEL)/config.json

run: venv checkpoint
	$(BIN)/latentmoe generate --model $(MODEL) --prompt "The experts of a mixture" --max-tokens 32 --temperature 0

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: venv checkpoint
	$(BIN)/python -m pytest -q tests/bench --co >/dev/null
	@echo "see README: each benchmark in tests/bench/ runs as a script"

clean:
	rm -rf $(VENV) gen build *.egg-info .pytest_cache .ruff_cache
