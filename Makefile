# Two commands do everything on a fresh machine:  make book   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup book test test-fast notebooks clean

setup: $(STAMP)

# The venv is rebuilt when the pins change. On a CUDA host, install the CUDA build of the
# pinned torch into .venv first (README) and this step keeps it.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@# MathJax for the built book, served locally so equations render offline (falls back to the CDN)
	-@test -f $(VENV)/mathjax_static/mathjax/tex-chtml.js || ( command -v npm >/dev/null && \
	  tmp=$$(mktemp -d) && (cd $$tmp && npm pack -q mathjax@3.2.2 >/dev/null 2>&1) && \
	  tar -xzf $$tmp/mathjax-3.2.2.tgz -C $$tmp package/es5/tex-chtml.js package/es5/output/chtml/fonts && \
	  mkdir -p $(VENV)/mathjax_static && rm -rf $(VENV)/mathjax_static/mathjax && \
	  mv $$tmp/package/es5 $(VENV)/mathjax_static/mathjax && rm -rf $$tmp ) || \
	  echo "note: MathJax not fetched (no npm?); the book will load it from its CDN"
	touch $(STAMP)

# Executes every chapter (profile: BLOODSEG_PROFILE, default quick on CPU, full on CUDA)
# and builds the HTML into _build/html. Warnings are errors.
# Chapter 8 uses the full BCCD named by $BLOODSEG_BCCD (`bloodseg download-bccd --out DIR` fetches it);
# a project checkout with ../shared/data/bccd beside it uses that copy; otherwise the 16-photo sample.
book: $(STAMP)
	BLOODSEG_BCCD=$${BLOODSEG_BCCD:-$(wildcard $(abspath ../shared/data/bccd))} \
	  $(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "open _build/html/index.html"

# Unit tests, then the notebooks re-executed in the smoke profile under nbval.
test: $(STAMP)
	BLOODSEG_PROFILE=smoke $(PY) -m pytest tests -q
	BLOODSEG_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider book

# Maintainers: re-execute the chapters in place (the outputs that are committed), in TOC order.
notebooks: $(STAMP)
	export BLOODSEG_BCCD=$${BLOODSEG_BCCD:-$(wildcard $(abspath ../shared/data/bccd))}; \
	for nb in $$(grep -o 'book/[0-9a-z_]*' _toc.yml); do \
	  if [ -f $$nb.ipynb ]; then echo "== $$nb"; start=$$(date +%s); \
	    $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	      --ExecutePreprocessor.timeout=1800 $$nb.ipynb || exit 1; \
	    echo "   $$(( $$(date +%s) - start )) s"; fi; done

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -x -m "not slow"

clean:
	rm -rf _build .jupyter_cache
