# The README's two commands: `make demo` and `make test`.  Both set up .venv
# first (idempotent, fast when already done).
PY := .venv/bin/python

.PHONY: setup demo test test-compat lint benchmark gpu-wheels gpu-check
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -W "ignore:pkg_resources is deprecated" tools/demo.py

# The whole suite on the pinned stack, then the compatibility job.
test: setup
	$(PY) -m pytest tests -q -ra --durations=15
	$(MAKE) --no-print-directory test-compat

# The library tests on the oldest supported stack (Python 3.8, torch 2.1, mmengine 0.10.0) in .venv-compat.
test-compat:
	bash scripts/test_compat.sh

lint: setup
	$(PY) -m ruff check orepa_mm tools tests configs

benchmark: setup
	$(PY) tools/analysis_tools/benchmark.py

# The GPU check (tools/analysis_tools/gpu_check.sh): tests with their CUDA cases and the
# detector benchmark, summarised in $(OUT)/gpu_check.{json,md}.  Run on the GPU machine with
# a CUDA torch and torchvision; `make gpu-wheels` (on a machine with registry access) fetches
# the pure-Python wheels it installs there into .whl/.
OUT ?= gpu_check
GPU_PYTHON ?= python3
gpu-wheels:
	bash scripts/gpu_wheels.sh

gpu-check:
	PYTHON=$(GPU_PYTHON) bash tools/analysis_tools/gpu_check.sh $(OUT)
