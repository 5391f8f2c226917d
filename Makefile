# Two commands do everything on a fresh machine:  make book   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup book test test-fast clean

setup: $(STAMP)

# The venv is rebuilt when the pins change. On a CUDA host, install the CUDA build of the
# pinned torch into .venv first (README) and this step keeps it.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Executes every chapter (profile: BLOODSEG_PROFILE, default quick on CPU, full on CUDA)
# and builds the HTML into _build/html. Warnings are errors.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "open _build/html/index.html"

# Unit tests, then the notebooks re-executed in the smoke profile under nbval.
test: $(STAMP)
	BLOODSEG_PROFILE=smoke $(PY) -m pytest tests -q
	BLOODSEG_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider book

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -x -m "not slow"

clean:
	rm -rf _build .jupyter_cache
