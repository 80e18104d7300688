# Quickstart targets: each creates .venv on first use, so they work on a fresh machine.
#   make demo   - QLoRA (nf4-dq) fine-tuning of the real all-MiniLM-L6-v2 on pydoc topics, a few minutes on CPU
#   make test   - ruff + the test suite (what CI runs)
# TORCH picks the torch wheel: the default is the CPU build; `make demo TORCH=torch` takes PyPI's default build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# optional, for fabric_quant.integrations.litgpt and its tests: without its dependencies (its pins are older than
# this project's, whose dependencies cover what it imports)
LITGPT ?= litgpt==0.5.13
BIN := $(VENV)/bin

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(LITGPT)"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python recipes/qlora.py --config configs/qlora/minilm-pydoc-nf4dq.yaml

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Not part of the quickstart: the every-mode table on MiniLM, eager only (a few minutes; the full configs/bench run
# with compiled rows takes much longer).
bench: $(VENV)/.installed
	$(BIN)/python recipes/bench.py --config configs/bench/minilm.yaml --compile false --autotune false --repeats 20 \
		--out_dir runs/bench-minilm-eager
