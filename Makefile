# Dispatcher: `make run` starts everything, `make test` runs the suite. `make help` lists all.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist; 0 runs in this process). Each has its own
# Redis, SQLite and PostgreSQL database; a test file stays in one process (its module
# fixtures, real workers included, start once).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: help venv run test test-sqlite lint format bench bench-rate bench-smpp smsc clean prometheus

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## Create .venv and install the project (done by every target that needs it)

run: $(STAMP) ## Start the whole system on 127.0.0.1 (embedded Redis, SQLite, API, workers, beat, Flower)
	$(VENV)/bin/dispatcher run

test: $(STAMP) ## Run the suite (plus PostgreSQL when its binaries exist; required when CI=true)
	@if [ "$$CI" = "true" ]; then $(MAKE) --no-print-directory prometheus; fi
	@if $(PY) scripts/pgtest.py available; then \
	  $(PY) scripts/pgtest.py run -- $(PYTEST) $(PYTEST_ARGS); \
	elif [ "$$CI" = "true" ]; then \
	  echo "CI=true: PostgreSQL binaries are required (initdb on PATH or /usr/lib/postgresql)"; exit 1; \
	else \
	  echo "PostgreSQL binaries not found: running on SQLite only"; \
	  $(PYTEST) $(PYTEST_ARGS); \
	fi

test-sqlite: $(STAMP) ## Run the suite on SQLite only
	$(PYTEST) $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + format check + mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy dispatcher api workers

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## Throughput benchmark (100k recipients, simulator, no rate limit); prints JSON lines
	$(PY) -m bench.throughput

bench-rate: $(STAMP) ## Rate-limit accuracy with 4 worker processes; prints JSON lines
	$(PY) -m bench.throughput --mode rate

prometheus: ## Install Debian's prometheus package (prometheus + promtool, for tests/deploy); needs root or sudo
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
	  echo "prometheus and promtool are installed"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; \
	fi

smsc: $(STAMP) ## A local SMSC on 127.0.0.1:2775 (receipts after 1 s, replies as MO) for DISPATCHER_PROVIDER=smpp
	$(VENV)/bin/dispatcher smsc --port 2775

bench-smpp: $(STAMP) ## SMPP (local SMSC) vs simulator, end to end; prints JSON lines
	$(PY) -m bench.throughput --provider smpp

clean: ## Remove the venv and local state (var/)
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
