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

# The embedded deployment on the random `mini` model (written once to ~/.cache/latentmoe): gRPC on :$(PORT),
# Prometheus metrics on :9400, until Ctrl-C. Try `.venv/bin/latentmoe client generate --prompt hi`.
run: venv
	$(BIN)/latentmoe serve --model mini --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# Benchmarks print tables and write JSON to bench-results/ (git-ignored); they are not part of `make test`.
bench: venv checkpoint
	mkdir -p bench-results
	$(BIN)/python -m tests.bench.bench_kv_bytes --output-json bench-results/kv_bytes.json
	$(BIN)/python -m tests.bench.bench_block_waste --output-json bench-results/block_waste.json
	$(BIN)/python -m tests.bench.bench_decode_attention --output-json bench-results/decode_attention.json
	$(BIN)/python -m tests.bench.bench_prefill_attention --output-json bench-results/prefill_attention.json
	$(BIN)/python -m tests.bench.bench_weight_layout --output-json bench-results/weight_layout.json
	$(BIN)/python -m tests.bench.bench_bf16_gemm --output-json bench-results/bf16_gemm.json
	$(BIN)/python -m tests.bench.bench_throughput --model $(MODEL) --dtype bfloat16 \
		--output-json bench-results/throughput-bf16.json
	$(BIN)/python -m tests.bench.bench_throughput --model $(MODEL) --dtype float32 \
		--output-json bench-results/throughput-fp32.json
	$(BIN)/python -m tests.bench.bench_transport --output-json bench-results/transport.json
	$(BIN)/python -m tests.bench.bench_distributed --model $(MODEL) --rounds 3 --dtype bfloat16 \
		--output-json bench-results/distributed-bf16.json
	$(BIN)/python -m tests.bench.bench_distributed --model $(MODEL) --rounds 3 --dtype float32 \
		--output-json bench-results/distributed-fp32.json

clean:
	rm -rf $(VENV) gen build *.egg-info .pytest_cache .ruff_cache
