# Ticketping: `make up` runs the whole mesh locally, `make test` runs the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
UV := .venv/bin/uv
UV_VERSION := 0.13.9
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: help venv gen install up down status test test-unit test-integration test-e2e \
        lint lint-protos breaking edge-validate k8s bench demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

.venv/.stamp: requirements.lock
	@test -x $(PY) || python3 -m venv .venv
	@test -x $(UV) || $(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip sync -q --python $(PY) requirements.lock
	@rm -f gen/.installed
	@touch $@

venv: .venv/.stamp  ## the Python environment, from the lock file

gen/.installed: .venv/.stamp scripts/gen_protos.py $(PROTOS)
	$(PY) scripts/gen_protos.py
	$(UV) pip install -q --python $(PY) --no-deps -e gen/python
	@touch $@

gen: gen/.installed  ## Python stubs (package ticketping-contracts) and gen/descriptor.binpb

install: venv  ## install what the platform needs (Redis, PostgreSQL, Kafka jars, buf)
	$(PY) -m devstack install

up: gen  ## install what is missing, start everything (dev profile), wait until healthy
	$(PY) -m devstack up

down:  ## stop everything `make up` started
	@if [ -x $(PY) ]; then $(PY) -m devstack down; fi

status: venv  ## what runs where
	$(PY) -m devstack status

lint-protos: gen  ## buf lint over the contracts
	scripts/buf.sh lint

breaking: gen  ## buf breaking against main's contracts
	scripts/buf.sh breaking

edge-validate: gen  ## envoy --mode validate over every config the project produces
	$(PY) -m pytest -q tests/unit/test_edge_config.py

k8s: gen install  ## build every k8s/ overlay with kustomize and check it (schemas, settings, policies)
	$(PY) -m pytest -q tests/unit/test_k8s.py tests/unit/test_image.py

lint: venv  ## ruff and mypy
	.venv/bin/ruff check .
	.venv/bin/mypy meshkit devstack edge bench svc_identity svc_catalog svc_queue svc_booking svc_payment flashsale

test-unit: gen
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: gen install
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: gen install
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

test: gen install lint lint-protos breaking  ## lints, then unit, integration (real servers), e2e (through Envoy)
	$(PY) -m pytest tests $(PYTEST_ARGS)

DEMO_ARGS ?=
demo: gen  ## a flash sale against `make up`'s mesh (2,000 fans, 500 seats; DEMO_ARGS="--fans 5000 ...")
	$(PY) -m flashsale $(DEMO_ARGS)

bench: gen install  ## benchmarks; figures and ratios printed and written to bench/reports/
	$(PY) -m bench

clean: down  ## remove build output and runtime state (keeps downloads in .cache)
	rm -rf gen .run
