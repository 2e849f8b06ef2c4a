# `make demo` and `make test` do all the set-up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair known to work together (torchvision must match torch; see README "Install").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Where the torch pair comes from: empty = the default index (CUDA wheels, ~6 GB of venv); a CPU-only
# machine can use PyTorch's CPU index instead: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: help install demo experiment demo-tiny toy-model intervene lens test test-all lint bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project (torch pair first)

demo: install  ## offline experiment: the toy world's trained model vs its three controls, with position baselines (CPU)
	WANDB_SILENT=true $(PY) -m probes.cli.main demo --out outputs/demo

experiment: install  ## the demo's comparison on 500 test / 200 val scenes (configs/toy/experiment.yaml; the BENCHMARKS figures)
	WANDB_SILENT=true $(PY) -m probes.cli.main demo --config configs/toy/experiment.yaml

demo-tiny: install  ## the pipeline alone on a tiny RANDOM-weight SD (CPU, ~1 min; numbers meaningless by design)
	WANDB_SILENT=true $(PY) train.py fit --config configs/tiny.yaml

# toy-model: the model recipe up to its VAE, then the labelers (which train on VAE round trips, one
# thread), then the rest of the model recipe (latents, U-Net on two threads, samples): the U-Net
# stage loses 3-4x beside another job, so nothing runs beside it. Quiet 2 cores, measured by stage
# (data/toy/*/RECIPE.md, BENCHMARKS.md "The V3 trial"): render 73 s, VAE 346 s, labelers ~1,300 s,
# latents 83 s, text 3 s, U-Net 5,000 steps at 0.5-0.6 s, samples 3 s: about 75 min.
toy-model: install  ## retrain the toy world's diffusion model and labelers from scratch (CPU, ~75 min on 2 quiet cores; resumable: rerun to continue)
	$(PY) -m probes.cli.main toy-model --out data/toy/model --work outputs/toy --until vae
	$(PY) -m probes.cli.main toy-labelers train --config configs/toy/labelers.yaml --out data/toy/labelers \
		--vae outputs/toy/vae.ckpt --force true
	$(PY) -m probes.cli.main toy-model --out data/toy/model --work outputs/toy

intervene: install  ## causal test: move the object, on the demo's ridge probes and on mean-difference probes (after make demo)
	WANDB_SILENT=true $(PY) -m probes.cli.main intervene --config configs/intervention/foreground.yaml \
		--probes outputs/demo/model/probes --images 32 --batch_size 8 --out outputs/demo/intervention/ridge
	test -f outputs/demo/mean_difference/probes/probes.json || WANDB_SILENT=true $(PY) train.py fit \
		--config configs/toy/mean_difference.yaml --run_dir outputs/demo/mean_difference
	WANDB_SILENT=true $(PY) -m probes.cli.main intervene --config configs/intervention/foreground_mean_difference.yaml \
		--probes outputs/demo/mean_difference/probes --images 32 --batch_size 8 --out outputs/demo/intervention/mean_difference
	WANDB_SILENT=true $(PY) -m probes.cli.main intervene --config configs/intervention/foreground_projection.yaml \
		--probes outputs/demo/mean_difference/probes --images 32 --batch_size 8 --out outputs/demo/intervention/projection

lens: install  ## semantic lens on the toy world: which layer keeps object semantics (toy model vs control)
	WANDB_SILENT=true $(PY) -m probes.cli.main lens --config configs/lens/toy.yaml

test: install  ## lint, then the test suite offline (slow tests skipped)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" --durations=10

test-all: install  ## every test, slow ones included
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=10

lint: install  ## ruff (configured in pyproject.toml)
	$(PY) -m ruff check .

bench: install  ## measure and write BENCHMARKS.md
	$(PY) -m probes.cli.main bench --out BENCHMARKS.md

clean:  ## remove outputs (runs, stores) and caches, keep .venv
	rm -rf outputs .pytest_cache
