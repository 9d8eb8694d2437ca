# captcha key vault kit — every target installs what it needs first.
#   make demo       the whole story on local parts (Vault, emulator, worker containers)
#   make test       lint + unit + integration + molecule, as CI runs it
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export ANSIBLE_CONFIG := $(abspath ansible.cfg)
export CONTAINERS_CONF := $(abspath testkit/containers.conf)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help venv host-deps image lint lint-python test test-units test-long test-solver test-playbooks test-molecule test-faults bench \
	test-monitoring test-collection fleet fleet-down demo demo-down clean

FLEET_HOSTS ?= 20

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.stamp: requirements.txt solver/pyproject.toml pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet -e solver -e .
	touch $@

venv: $(VENV)/.stamp  ## controller virtualenv with pinned Python deps

host-deps:  ## Debian packages: the container testbed (podman, runc, mmdebstrap) and promtool (prometheus)
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq podman runc mmdebstrap uidmap; }
	@# promtool is all the tests use: the server the package starts under systemd is stopped.
	@command -v promtool >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus \
	    && { $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1 || true; }; }

image: venv host-deps  ## build the Debian systemd host image (only when its recipe changed)
	$(BIN)/python -m testkit.hosts build

lint: venv  ## yamllint, ansible-lint (production), module docs, ruff, mypy, detect-secrets
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint --profile production
	$(MAKE) --no-print-directory lint-python

lint-python: venv  ## module docs, ruff, mypy, detect-secrets
	$(BIN)/ansible-doc --metadata-dump captcha_kit.vault > /dev/null
	$(BIN)/ansible-doc --metadata-dump captcha_kit.captchaai > /dev/null
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd solver && ../$(BIN)/mypy
	$(BIN)/mypy
	git ls-files -z | xargs -0 $(BIN)/detect-secrets-hook --baseline .secrets.baseline

test-units: venv  ## the collections' and the worker role's unit tests (seconds, no server)
	$(BIN)/pytest collections/ansible_collections/captcha_kit/vault/tests/unit collections/ansible_collections/captcha_kit/captchaai/tests/unit roles/captcha_worker/tests/unit

test-monitoring: venv host-deps  ## promtool rule tests, the metric-name check against a worker, the rotation's textfile metrics
	$(BIN)/pytest tests/test_monitoring.py tests/test_rotation_textfile.py

test-collection: venv  ## captcha_kit.vault: galaxy build, install + provision with it, ansible-test sanity; the EE build context
	$(BIN)/pytest tests/test_collection_build.py

test-solver: venv  ## the solver package: unit tests + integration against OpenBao and the emulator
	cd solver && ../$(BIN)/pytest

test-playbooks: venv image  ## tools, emulator and playbook suites (real Vault, worker containers)
	$(BIN)/pytest tests -m "not slow_faults and not long"

test-molecule: venv image  ## every molecule scenario
	$(BIN)/python -m testkit.portlock -- $(BIN)/molecule test --all

test-faults: venv image  ## every fault test, the slow ones (minutes each) included
	$(BIN)/pytest tests/faults

test-long: venv image  ## compressed production time alone: secret-ids expiring under a deploy schedule (about 10 min; a stage of make test)
	$(BIN)/pytest tests -m long

test: venv image  ## everything CI runs: lint, unit tests, solver, playbook suites, molecule; three lanes, timed
	$(BIN)/python tests/stages.py

bench: venv  ## benchmarks; results go to bench/results-*.md (see bench/README.md)
	$(BIN)/python -m bench.solver_throughput --write-results bench/results-solver.md
	$(BIN)/python -m bench.vault_suite --write-results bench/results-vault.md

fleet: venv image  ## FLEET_HOSTS (20) SSH hosts in two envs + 3-node raft OpenBao: deploy, rolling redeploy, rotation with the leader killed; figures to bench/results-fleet.md
	$(BIN)/python -m bench.fleet_hosts up --hosts $(FLEET_HOSTS) --write-results bench/results-fleet.md

fleet-down: venv  ## remove what `make fleet` started
	$(BIN)/python -m bench.fleet_hosts down

demo: venv image  ## local Vault + emulator + two workers, provision, deploy, rotate
	$(BIN)/python -m tools.demo up

demo-down: venv  ## stop everything the demo started
	$(BIN)/python -m tools.demo down

clean: demo-down  ## remove local state (keeps the venv and the image)
	rm -rf .state
