# The two commands: `make run` and `make test`.  Each creates its own venv
# and installs what it needs on first use: .venv-run holds chatweb and what
# running it needs (a plain install, redone when the sources change); .venv
# holds an editable install with the test tools.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_VENV := .venv-run
RUN_BIN := $(RUN_VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7777
DATA_DIR ?=
RESPONDER ?= none
ARGS ?=
SOURCES := $(shell find chatweb twisted -name '*.py' -o -name '*.html' 2>/dev/null)

.PHONY: run test bench bench-table clean

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "chatweb needs Python 3.10 or newer" or 0)'

$(RUN_VENV)/.installed: setup.cfg pyproject.toml $(SOURCES)
	@$(MAKE) --no-print-directory check-python
	@test -x $(RUN_BIN)/python || $(PYTHON) -m venv $(RUN_VENV)
	@echo "make run: installing chatweb into $(RUN_VENV)"
	@$(RUN_BIN)/pip install --quiet --disable-pip-version-check .
	@touch $@

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

run: $(RUN_VENV)/.installed
	@HOST='$(HOST)' PORT='$(PORT)' DATA_DIR='$(DATA_DIR)' RESPONDER='$(RESPONDER)' BIN='$(RUN_BIN)' exec sh scripts/run.sh $(ARGS)

test: $(VENV)/.installed
	@sh scripts/ensure-browser.sh
	@sh scripts/ensure-postgresql.sh
	$(BIN)/python -m pytest tests

bench: $(VENV)/.installed
	$(BIN)/python bench/run.py

# One table of ratios against baselines of the same run (bench/README.md);
# needs wrk (apt-get install wrk) and taskset.
bench-table: $(VENV)/.installed
	$(BIN)/python bench/table.py

clean:
	rm -rf $(VENV) $(RUN_VENV) .venv-min build *.egg-info _trial_temp
