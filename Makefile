# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs everything on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-stamp
# Offline and safe defaults for every command run from here (fedcrm also sets them itself).
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Every install goes through the constraints file: torch must stay the CPU build on disk.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install demo test check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install "pip>=25.1"
	$(PIP) install torch==2.13.0
	$(PIP) install -e . --group dev
	# Data-only packages: their own dependency pins are irrelevant (we read their files).
	$(PIP) install --no-deps recbole==1.2.1 lifetimes==0.11.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedcrm demo

test: $(STAMP)
	scripts/check
	$(PY) -m pytest

check: $(STAMP)
	scripts/check

bench: $(STAMP)
	$(PY) bench/churn_utility.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
