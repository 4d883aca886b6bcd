# The front door. `make dev` brings up the stack, the three services and a demo; `make test` runs
# the whole suite against a real Postgres and Kafka. Every target installs what it is missing.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PY := .venv/bin/python
SERVICES := identity journey delivery
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen

.PHONY: help venv protos stack dev down test pytest lint fmt bench migrate

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

venv: ## create .venv and install the Python dependencies (once per pyproject change)
	@scripts/bootstrap.sh

protos: venv ## generate Python code from protos/ into gen/ and lint the protos with buf
	@scripts/protos.sh

stack: ## start PostgreSQL and Kafka as native processes (idempotent)
	@scripts/stack.sh up

dev: protos stack ## bring up the stack and the three services, and show how to reach them
	@scripts/dev.sh up

down: ## stop the services and the stack (state is kept in .stack/)
	@if [ -x scripts/dev.sh ] && [ -x .venv/bin/python ]; then scripts/dev.sh down; fi
	@scripts/stack.sh down

test: lint stack ## lint, then run the whole test suite against the local stack
	@$(PY) -m pytest

pytest: protos stack ## run the tests only (pass ARGS="-k outbox -x" to narrow)
	@$(PY) -m pytest $(ARGS)

lint: protos ## ruff, mypy, buf (run by protos) and an offline check of docker-compose.yml
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .
	@.venv/bin/mypy
	@scripts/check_compose.sh

fmt: venv ## format and auto-fix the Python code
	@.venv/bin/ruff format .
	@.venv/bin/ruff check --fix .

bench: protos stack ## run the benchmarks and write bench/results.json (SIZE=tiny for a smoke run)
	@$(PY) -m bench $(if $(SIZE),--size $(SIZE),)

.PHONY: chaos
chaos: protos stack ## the fault suite at full size on a private Postgres and Kafka (SIZE=ci|full, SEED=n to replay)
	@TIDINGS_CHAOS_SIZE=$(or $(SIZE),full) TIDINGS_CHAOS_SEED=$(SEED) $(PY) -m pytest tests/chaos -p no:cacheprovider -s -q $(ARGS)

migrate: protos stack ## apply every service's migrations (services also do it at start-up)
	@for svc in $(SERVICES); do TIDINGS_LOG_FORMAT=$${TIDINGS_LOG_FORMAT:-text} $(PY) -m services.$$svc migrate; done

import-users: protos ## import users from a CSV file (ARGS="file.csv --id-column id --column email=email ...")
	@$(PY) -m services.cli.import_users $(ARGS)
