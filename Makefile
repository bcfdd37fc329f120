# Quick start: `make run` (train + evaluate the default experiment), `make test` (the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds this project is tested with (a local copy on our machines)
TORCH := torch==2.14.1 torchvision==0.29.1

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m gain_exp.run $(ARGS)

test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python -m gain_exp.bench $(ARGS)

.PHONY: install run test bench
