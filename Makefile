# Quick start: `make run` (train + evaluate the default experiment), `make test` (the test suite).
# The edit loop: `make test-fast`, `make lint`, `make docs`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds this project is tested with (a local copy on our machines)
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_JOBS ?=

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test,dev]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m gain_exp.run $(ARGS)

# the whole suite (slow and gpu tiers included; gpu tests skip without a CUDA device): what CI runs
test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest $(PYTEST_JOBS) $(ARGS)

# the edit loop: everything not marked slow (subprocess, multi-process and multi-minute tests)
test-fast: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -m "not slow" $(ARGS)

# ruff lint + format check (ruff format . and ruff check --fix . repair what they can)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the docs site (docs/, mkdocs.yml): docs-build checks every link, docs serves it at http://127.0.0.1:8000
docs-build: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs: install
	$(BIN)/mkdocs serve

bench: install
	$(BIN)/python -m gain_exp.bench $(ARGS)

# The GPU table of docs/speed.md on one NVIDIA device (no install: PYTHON=python3 where torch is already there):
# resnet50 and vgg16_bn, 224 px, batch 64; fp32, bf16, bf16 + channels_last, + compile; every grad mode under bf16.
# Tables go to outputs/bench_gpu/<backbone>.md.
PYTHON ?= $(BIN)/python
BENCH_GPU := --device cuda --batch 64 --size 224 --variants plain,batch,per_label --repeats 20
bench-gpu:
	mkdir -p outputs/bench_gpu
	set -e; for b in resnet50 vgg16_bn; do \
	  $(PYTHON) -m gain_exp.bench --backbone $$b $(BENCH_GPU) --modes features > outputs/bench_gpu/$$b.md; \
	  for flags in "--amp --modes full,features,frozen" "--amp --channels-last --modes features" \
	               "--amp --channels-last --compile --modes features"; do \
	    $(PYTHON) -m gain_exp.bench --backbone $$b $(BENCH_GPU) $$flags >> outputs/bench_gpu/$$b.md; \
	  done; cat outputs/bench_gpu/$$b.md; done

.PHONY: install run test test-fast lint docs docs-build bench bench-gpu

# The prepared CUDA check (issue 25, docs/speed.md): pytest -m gpu, memory over 300 GAIN steps, the speed table, each
# stage under its own timeout, <= 9 min in all; a markdown + JSON report in outputs/gpu_check/<date>/ (or ARGS=DIR).
# No install needed (it sets up its own Python); ARGS=--dry-run runs every stage on CPU with tiny sizes (~2 min).
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

.PHONY: gpu-check
