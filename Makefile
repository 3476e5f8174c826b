# Two commands on a fresh machine: `make run` and `make test` (both install first).
# REDIS_URL / DATABASE_URL switch from the embedded servers under DATA_DIR (./.data) to
# external ones.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 8080
WORKER_PORT ?= 9101
WEBHOOK_PORT ?= 8090

.PHONY: install run test test-faults lint format bench stop check clean system-tools

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[embedded,test]'
	touch $(STAMP)

install: $(STAMP)

check: install
	$(BIN)/costproxy config check

# Proxy on :$(PORT), webhook listener on :$(WEBHOOK_PORT) and the worker, on embedded
# Redis and PostgreSQL kept under ./.data unless REDIS_URL / DATABASE_URL are set. Ctrl-C
# stops all three (the embedded servers keep running for the next start; `make stop`).
run: check
	$(BIN)/costproxy migrate
	trap 'kill 0' INT TERM EXIT; \
	$(BIN)/costproxy worker --port $(WORKER_PORT) & \
	$(BIN)/costproxy webhooks --port $(WEBHOOK_PORT) & \
	$(BIN)/costproxy serve --port $(PORT)

# The dashboard test drives Debian's Chromium; promtool checks the alert rules. Installed
# from Debian's packages when missing and we may (root with apt-get); else those tests skip.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/promtool
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do [ -x $$t ] || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and prometheus (promtool) from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium prometheus >/dev/null \
	    || echo "could not install them: the browser and promtool tests will skip"; \
	fi

# ruff (lint and format) over everything, mypy --strict over the package and the benchmark.
lint: install
	$(BIN)/ruff check proxy bench tests
	$(BIN)/ruff format --check proxy bench tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix proxy bench tests
	$(BIN)/ruff format proxy bench tests

test: install system-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not faults"

# Real processes killed, stopped and flushed under traffic, each ending with `ledger check`.
test-faults: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m faults -s tests/faults

bench: install
	$(BIN)/python -m bench.run

stop: install
	$(BIN)/python -c 'import os, pathlib; from proxy.embedded import stop_all; stop_all(pathlib.Path(os.environ.get("DATA_DIR") or ".data"))'

clean:
	rm -rf $(VENV) *.egg-info
