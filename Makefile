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

.PHONY: install run test bench stop check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
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

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python -m bench.run

stop: install
	$(BIN)/python -c 'import os, pathlib; from proxy.embedded import stop_all; stop_all(pathlib.Path(os.environ.get("DATA_DIR") or ".data"))'

clean:
	rm -rf $(VENV) *.egg-info
