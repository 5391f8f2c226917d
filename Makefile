# Two commands do everything on a fresh machine:  make book   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The "Try it on your own smear" page runs the shipped network in the reader's browser with these
# two npm packages (exact versions; the tarballs' sha256 are checked). Only the files the page loads
# are kept, in $(TRYIT_VENDOR) (git-ignored), the two large ones gzipped: the page unpacks them itself.
TRYIT_ORT_VERSION := 1.23.2
TRYIT_ORT_SHA := 0b8707d7efab9a2bea63564d66cad79e897cfd0bd627e5ae000488ffc1c45c7d
TRYIT_CV_VERSION := 4.10.0-release.1
TRYIT_CV_SHA := 00ef9ced104d7ad89063513691b2d37b8e5f8075ff30f360d271745a580fed7e
TRYIT_VENDOR := $(VENV)/tryit_vendor
TRYIT_PINS := $(TRYIT_VENDOR)/.pins-ort-$(TRYIT_ORT_VERSION)-cv-$(TRYIT_CV_VERSION)
# matplotlib's font cache lives in the venv, not in ~/.cache/matplotlib: a shared cache written by
# another checkout's venv can miss matplotlib's own fonts (e.g. when that venv was deleted while it
# was built), and the "findfont" messages it then prints on stderr fail the book build (-W).
export MPLCONFIGDIR := $(abspath $(VENV))/mplconfig

.PHONY: setup book test test-fast notebooks clean

setup: $(STAMP) $(TRYIT_PINS)

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

# onnxruntime-web (WebAssembly build, MIT) and OpenCV.js (Apache-2.0) for book/try_it.md, fetched with
# `npm pack`; without npm (or offline) the page builds and says that its runtime is missing.
$(TRYIT_PINS): | $(STAMP)
	-@command -v npm >/dev/null || { echo "note: npm not found: the 'Try it' page will have no runtime (install npm, then make setup)"; exit 0; }; \
	  tmp=$$(mktemp -d) && cd $$tmp && npm pack -q onnxruntime-web@$(TRYIT_ORT_VERSION) @techstark/opencv-js@$(TRYIT_CV_VERSION) >/dev/null 2>&1 && \
	  echo "$(TRYIT_ORT_SHA)  onnxruntime-web-$(TRYIT_ORT_VERSION).tgz" | sha256sum -c --quiet && echo "$(TRYIT_CV_SHA)  techstark-opencv-js-$(TRYIT_CV_VERSION).tgz" | sha256sum -c --quiet && \
	  mkdir ort cv && tar -xzf onnxruntime-web-$(TRYIT_ORT_VERSION).tgz -C ort && tar -xzf techstark-opencv-js-$(TRYIT_CV_VERSION).tgz -C cv && \
	  mkdir -p vendor && cp ort/package/dist/ort.wasm.min.js ort/package/dist/ort-wasm-simd-threaded.mjs vendor/ && \
	  gzip -9nc ort/package/dist/ort-wasm-simd-threaded.wasm > vendor/ort-wasm-simd-threaded.wasm.gz && \
	  gzip -9nc cv/package/dist/opencv.js > vendor/opencv.js.gz && \
	  printf 'onnxruntime-web $(TRYIT_ORT_VERSION) (npm), MIT License: https://github.com/microsoft/onnxruntime/blob/main/LICENSE\nOpenCV.js: @techstark/opencv-js $(TRYIT_CV_VERSION) (npm), a build of OpenCV, Apache License 2.0: https://github.com/opencv/opencv/blob/4.x/LICENSE\n' > vendor/LICENSES.txt && \
	  cd - >/dev/null && rm -rf $(TRYIT_VENDOR) && mv $$tmp/vendor $(TRYIT_VENDOR) && rm -rf $$tmp && touch $@ || \
	  { rm -rf "$$tmp"; echo "note: onnxruntime-web / OpenCV.js not fetched (npm offline?): the 'Try it' page will say its runtime is missing"; }

# Executes every chapter (profile: BLOODSEG_PROFILE, default quick on CPU, full on CUDA)
# and builds the HTML into _build/html. Warnings are errors.
# Chapter 8 uses the full BCCD named by $BLOODSEG_BCCD (`bloodseg download-bccd --out DIR` fetches it);
# a project checkout with ../shared/data/bccd beside it uses that copy; otherwise the 16-photo sample.
book: $(STAMP) $(TRYIT_PINS)
	BLOODSEG_BCCD=$${BLOODSEG_BCCD:-$(wildcard $(abspath ../shared/data/bccd))} \
	  $(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "open _build/html/index.html"

# Unit tests, then the notebooks re-executed in the smoke profile under nbval (the 15 slowest of each
# are listed). Two pytest-xdist workers were tried: no faster, the tests already use both cores.
test: $(STAMP) $(TRYIT_PINS)
	BLOODSEG_PROFILE=smoke $(PY) -m pytest tests -q --durations=15
	BLOODSEG_PROFILE=smoke $(PY) -m pytest -q --nbval-lax -p no:cacheprovider --durations=15 book

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
