# `make demo` and `make test` do all the set-up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair known to work together (torchvision must match torch; see README "Install").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help install demo test test-all lint bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project (torch pair first)

demo: install  ## offline end-to-end experiment on a tiny random-weight SD (CPU, < 3 min)
	WANDB_SILENT=true $(PY) train.py fit --config configs/tiny.yaml

test: install  ## lint, then the test suite offline (slow tests skipped)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" --durations=10

test-all: install  ## every test, slow ones included
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=10

lint: install  ## ruff (configured in pyproject.toml)
	$(PY) -m ruff check .

bench: install  ## measure and write BENCHMARKS.md
	$(PY) -m probes.bench --out BENCHMARKS.md

clean:  ## remove outputs (runs, stores) and caches, keep .venv
	rm -rf outputs .pytest_cache
