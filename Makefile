# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= build

.PHONY: install demo test quick mutate api-check bench-ci bench-baseline bench-spread bench gpu-check wheelhouse clean

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

# The whole suite, one process (two pytest-xdist workers measured 5% faster on 2 cores: the tests are CPU-bound
# and each worker builds the session's models again); its 15 slowest tests are printed.
test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

# The quick loop: everything but the slow set, on two workers (1.5x faster than one on 2 cores).
quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow"

clean:
	rm -rf $(OUT) .pytest_cache

# Named one-line breaks of the product's rules (tools/mutations.py) against the tests that guard them, in a copy of the
# package; exits 1 on a break the tests pass. Not part of `make test`: run it before resolving an issue that adds a rule.
ONLY ?=
mutate: $(STAMP)
	$(BIN)/python tools/mutate.py --only "$(ONLY)"

# The GPU modules type-checked against the real TensorRT Python bindings (imported over a NULL shim: API only,
# nothing builds or runs) of the oldest supported 10.x, the newest 10.x and the newest 11.x (tools/trt_api_versions).
# Wheels, shims and stubs are cached under $(VENV)/trt-api; tests/engine/test_trt_double.py holds the test double to the
# same stubs. Needs gcc and PyPI.
TRT_API_VERSIONS = $(shell cat tools/trt_api_versions)
api-check: $(STAMP)
	PYRIGHT_PYTHON_CACHE_DIR=$(abspath $(VENV))/pyright $(BIN)/python tools/trt_api_check.py $(VENV)/trt-api $(TRT_API_VERSIONS)

# The short CPU benchmark CI runs after the tests; it prints its Markdown report and the comparison with the
# committed baseline of this CPU class (benchmarks/baselines/), failing (exit 3) on a regression.
BENCH_CI = $(BIN)/resnet-export bench --arch resnet18 --backends torch,ort,openvino --precisions fp32,int8 \
		--batch-sizes 1,8 --warmup 3 --min-time 1 --threads 2
BENCH_CI_TOLERANCE ?= 40
bench-ci: $(STAMP)
	$(BENCH_CI) --report $(OUT)/bench-ci --baseline benchmarks/baselines --max-regression $(BENCH_CI_TOLERANCE)

# Refresh the CI baseline of this machine's CPU class on purpose: run it, then commit the file it names.
bench-baseline: $(STAMP)
	$(BENCH_CI) --report $(OUT)/bench-baseline
	$(BIN)/python -c "import json, shutil, sys; from resnet_export.bench.baseline import cpu_class; \
		r = json.load(open('$(OUT)/bench-baseline/report.json')); \
		target = 'benchmarks/baselines/bench-ci-' + cpu_class(r['environment']) + '.json'; \
		shutil.copyfile('$(OUT)/bench-baseline/report.json', target); print('baseline written:', target)"

# The full CPU matrix on resnet50 (several minutes); see benchmarks/README.md for GPUs.
bench: $(STAMP)
	$(BIN)/resnet-export bench --arch resnet50 --backends torch,ort,openvino --precisions fp32,fp16,int8 \
		--batch-sizes 1,8,32 --min-time 5 --threads $$(nproc) --report benchmarks/results/resnet50-cpu

# The run-to-run spread of the CI benchmark on this machine (PAIRS pairs of back-to-back runs), which
# BENCH_CI_TOLERANCE must exceed; benchmarks/README.md records it.
PAIRS ?= 10
bench-spread: $(STAMP)
	$(BIN)/python benchmarks/spread.py $(OUT)/bench-spread $(PAIRS) -- $(BENCH_CI)

# Every GPU claim in one command, on one CUDA GPU (TensorRT rows where it is installed): `pytest -m gpu`, the plain
# PyTorch peer script, the GPU matrix on resnet50, and a verdict (exit 1 naming each failed claim); writes
# benchmarks/results/gpu-<gpu>/ as it goes (see benchmarks/gpu_check.py). On a machine whose own Python has the
# image's packages and no package index can be reached, with the wheelhouse carried to ./wheelhouse:
#   make gpu-check GPU_PYTHON=python3    (the project on PYTHONPATH, no .venv; the wheels in a temporary prefix)
GPU_PYTHON ?=
GPU_CHECK_ARGS ?=
gpu-check: $(if $(GPU_PYTHON),,$(STAMP))
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(or $(GPU_PYTHON),$(BIN)/python) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The wheels gpu-check needs beyond a GPU image (onnxruntime-gpu, ModelOpt and what they require, at this .venv's
# versions), for that image's Python, with a manifest of sha256 and wheels over PIECE_MB split into pieces; needs a
# package index. Carry wheelhouse/ to the GPU machine's checkout (a piece per transfer where transfers are capped).
PIECE_MB ?= 60
GPU_IMAGE_PYTHON ?= 3.12
wheelhouse: $(STAMP)
	$(BIN)/python benchmarks/wheelhouse.py collect wheelhouse --python-version $(GPU_IMAGE_PYTHON) --piece-mb $(PIECE_MB)
