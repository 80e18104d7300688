# Quickstart targets: each creates .venv on first use, so they work on a fresh machine.
#   make demo   - quantize the real all-MiniLM-L6-v2 in every mode and print the comparison table
#   make test   - ruff + the test suite (what CI runs)
# TORCH picks the torch wheel: the default is the CPU build; `make demo TORCH=torch` takes PyPI's default build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python recipes/quantize_modes.py

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
