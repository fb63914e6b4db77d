# budgetd — every target installs what it needs first, so `make run` and `make test`
# are the only commands a newcomer types.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN := server/gen
PROTOS := $(wildcard proto/budgetd/v1/*.proto)
CONFIG ?= examples/config.yaml

.PHONY: all install run test lint format typecheck proto proto-check soak bench clean

all: lint typecheck test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default (SQLite under ./.budgetd, in-process counters): no services needed.
# It loads examples/config.yaml (its model_list prices llama3, so the seed's walkthrough
# through a gateway ends in the seed's denial) unless BUDGETD_CONFIG or CONFIG says otherwise.
# A development master key is set when none is given, so the README walkthrough works as is.
# It goes in LITELLM_MASTER_KEY too, so that a LiteLLM config's
# `master_key: os.environ/LITELLM_MASTER_KEY` (examples/config.yaml) resolves.
run: $(STAMP)
	@if [ -z "$$BUDGETD_MASTER_KEY$$LITELLM_MASTER_KEY" ]; then \
	  echo "make run: no master key set; using the development key sk-1234 (set BUDGETD_MASTER_KEY to change it)"; fi
	BUDGETD_MASTER_KEY=$${BUDGETD_MASTER_KEY:-$${LITELLM_MASTER_KEY:-sk-1234}} \
	LITELLM_MASTER_KEY=$${LITELLM_MASTER_KEY:-$${BUDGETD_MASTER_KEY:-sk-1234}} \
	  $(BIN)/budgetd up --config $${BUDGETD_CONFIG:-$(CONFIG)} $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# A bounded mixed load with faults on a timer, ending in a one-line report (not part of CI;
# its 60 s form is, in tests/test_soak.py). SOAK_SECONDS=120 make soak for a shorter run.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python tests/soak.py --duration $(SOAK_SECONDS)

# budgetd's decision path next to a no-op floor in the same runtime (issue 7, bench/README.md):
# its own Postgres, Redis, budgetd, floor and Envoy on loopback; h2load and wrk from Debian.
# Prints a table and writes bench/results/<UTC stamp>.json and .png (and latest.*). Exits 0
# when targets are missed (it reports), non-zero only when the harness fails. Full form:
# a few minutes; quick form: make bench BENCH_SECONDS=5 BENCH_KEYS=20000 BENCH_TEAMS=2000
# (also BENCH_ROUNDS, BENCH_WARMUP, BENCH_CONCURRENCY, BENCH_DRIVE_KEYS, BENCH_COLD_STARTS).
bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

# Generated code lives in server/gen; protoc names imports after the proto path, so the
# grpc module's import is rewritten to the package it lives in.
proto: $(STAMP)
	rm -rf $(GEN)/budgetd
	mkdir -p $(GEN)/budgetd/v1
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) \
	  --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	sed -i 's/^from budgetd\.v1 import /from server.gen.budgetd.v1 import /' \
	  $(GEN)/budgetd/v1/*_grpc.py $(GEN)/budgetd/v1/*_grpc.pyi
	touch $(GEN)/__init__.py $(GEN)/budgetd/__init__.py $(GEN)/budgetd/v1/__init__.py

# Fails when the committed generated code differs from what `make proto` produces.
proto-check: $(STAMP)
	$(MAKE) --no-print-directory proto
	git diff --exit-code --stat -- $(GEN) || \
	  (echo "generated gRPC code is stale: run 'make proto' and commit server/gen"; exit 1)
	@test -z "$$(git status --porcelain -- $(GEN))" || \
	  (echo "untracked generated files: run 'make proto' and commit server/gen"; git status --porcelain -- $(GEN); exit 1)

clean:
	rm -rf $(VENV) .budgetd .pytest_cache .mypy_cache .ruff_cache
