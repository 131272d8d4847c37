# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= build

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job on the CPU: export resnet50 with BatchNorm folded, verify it against PyTorch on real images.
demo: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/resnet-export onnx --arch resnet50 --images tests/data/images -o $(OUT)/resnet50.onnx

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(OUT) .pytest_cache
