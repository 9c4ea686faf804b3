# One task runner: the README and CI call these targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test-pinot pinot pinot-stop install up test test-fast lint typecheck generate generate-check proto-lint proto-breaking check infra-up infra-down kafka kafka-stop bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## Run the whole system on the embedded default (DuckDB + SQLite + real Envoy).
up: install
	$(BIN)/bilten-analytics up

## Run the whole test suite (starts PostgreSQL, Redis and Kafka for the tiers that need them).
test: install
	bash scripts/test.sh

test-fast: install
	$(BIN)/pytest -q -m "not e2e and not kafka and not postgres" -n 2

lint: install
	$(BIN)/ruff check services schema_registry tests scripts
	$(BIN)/ruff format --check services schema_registry tests scripts

typecheck: install
	$(BIN)/mypy

generate: install
	$(BIN)/python scripts/proto.py generate
	$(BIN)/python k8s/generate.py

generate-check: install
	$(BIN)/python scripts/proto.py check

proto-lint: install
	$(BIN)/python scripts/proto.py lint

proto-breaking: install
	$(BIN)/python scripts/proto.py breaking $${BUF_AGAINST:-main}

check: lint typecheck generate-check proto-lint proto-breaking

kafka:
	bash dev/kafka.sh start

kafka-stop:
	bash dev/kafka.sh stop

bench: install
	$(BIN)/bilten-analytics bench ingest
	$(BIN)/bilten-analytics bench query

clean:
	rm -rf .bilten .pytest_cache .mypy_cache .ruff_cache

## Opt-in: events -> Kafka -> real Apache Pinot 0.11 (with the shims of docs/pinot-on-this-machine.md).
test-pinot: install
	BILTEN_TEST_PINOT=1 $(BIN)/pytest -q tests/pinot

pinot:
	bash dev/pinot.sh start

pinot-stop:
	bash dev/pinot.sh stop
