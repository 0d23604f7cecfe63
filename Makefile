# The README's commands: `make serve`, `make test` and `make test-all` (the whole suite, CI's).
# Each builds .venv when it is missing.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK := requirements.lock

.PHONY: serve test test-all lint lock compose-smoke bench clean-venv

# Debian's Chromium, for the test that renders the web page headless (root here, as in CI).
CHROMIUM := /usr/bin/chromium

# Every version comes from the lock (deploy/lock.py), as in the image. torch first, at the lock's
# version: here that is the CPU build on this machine's disk (2.13.0+cpu satisfies torch==2.13.0),
# installed before anything can pull a CUDA one.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) torch
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev,s3]'
	touch $(STAMP)

# Regenerate the lock after changing pyproject.toml's dependencies, keeping every pin it can;
# `make lock UPGRADE=1` moves every package to its newest version (README: "The lock").
lock:
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) uv
	$(BIN)/python deploy/lock.py $(if $(UPGRADE),--upgrade)

serve: $(STAMP)
	$(BIN)/advorch serve

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Debian's docker-compose 1.29, for the test that reads the compose files as older hosts do
# (Docker Compose v2 comes with the dev extras). No Docker engine: the test only parses.
DOCKER_COMPOSE_V1 := /usr/bin/docker-compose

$(DOCKER_COMPOSE_V1):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose

# Two pytest-xdist workers; the Ray tests, one group (xdist_group "ray"), all go to one of them.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadgroup

# The suite a developer runs: every test but those marked slow.
test: $(STAMP) $(CHROMIUM) $(DOCKER_COMPOSE_V1)
	$(PYTEST) -m "not slow"

# The whole suite, as CI runs it (.ci/run), with branch coverage of every process the tests
# start; below `fail_under` it fails.
test-all: $(STAMP) $(CHROMIUM) $(DOCKER_COMPOSE_V1)
	$(PYTEST) --cov --cov-report=term --cov-report=html:htmlcov

lint: $(STAMP)
	$(BIN)/python deploy/lock.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The compose stack, built and run for real on this host's Docker (in neither test command).
compose-smoke: $(STAMP)
	deploy/compose-smoke

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean-venv:
	rm -rf $(VENV)
