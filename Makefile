# One entry point: install, protos, test, run, lint, bench. Everything installs from scratch.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# Debian packages the runtimes need: compilers and cmake for llama-cpp-python and stable-diffusion-cpp-python,
# which build from source (pip caches the built wheels). Audio decoding and espeak-ng ship inside wheels.
# postgresql: the store's tests run their own server from its binaries (never the cluster it sets up).
APT_PACKAGES ?= build-essential cmake postgresql chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install apt protos check-protos test test-unit test-integration lint format run bench clean

help:
	@echo "make install   create $(VENV) and install every dependency (Python and Debian)"
	@echo "make run       demo: a balancer and a node serving gemma-3-270m, whisper-base and a Piper voice (Ctrl-C stops)"
	@echo "make test      install, check generated stubs, run every test"
	@echo "make lint      ruff + mypy"
	@echo "make protos    regenerate common/pb from protos/"
	@echo "make bench     run the benchmarks and rewrite bench/RESULTS.md (one: python -m bench bench_x)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,models]"
	touch $(STAMP)

# Without apt (not Debian or Ubuntu, e.g. macOS) nothing is installed here: the same tools must come
# from the system's own packages (docs/install.md).
apt:
	@if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then \
	  echo "no apt-get here: install $(APT_PACKAGES) (or their equivalents) yourself"; exit 0; \
	fi; \
	missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

protos: install
	$(PY) protos/generate.py

# CI fails when the committed stubs differ from what the .proto files generate.
check-protos: protos
	@if [ -n "$$(git status --porcelain -- common/pb)" ]; then \
	  git status --short -- common/pb; git --no-pager diff --stat -- common/pb; \
	  echo "generated stubs drifted from protos/: run 'make protos' and commit common/pb"; exit 1; \
	fi

test: install check-protos
	LLMLB_REQUIRE_MODELS=1 LLMLB_REQUIRE_POSTGRES=1 $(BIN)/pytest -q --durations=15 tests/unit tests/integration tests/e2e

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration tests/e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run: install
	$(PY) -m devkit.demo

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
