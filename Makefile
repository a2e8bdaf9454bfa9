# The two commands: `make run` and `make test`.  Both create .venv and
# install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7777
DATA_DIR ?=
RESPONDER ?= none

.PHONY: run test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "chatweb needs Python 3.10 or newer" or 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

run: $(STAMP)
	@HOST='$(HOST)' PORT='$(PORT)' DATA_DIR='$(DATA_DIR)' RESPONDER='$(RESPONDER)' BIN='$(BIN)' sh scripts/run.sh

test: $(STAMP)
	@sh scripts/ensure-browser.sh
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
