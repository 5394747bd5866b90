# The README's two commands: `make demo` and `make test`.  Both set up .venv
# first (idempotent, fast when already done).
PY := .venv/bin/python

.PHONY: setup demo test test-compat test-users lint benchmark gpu-wheels gpu-check
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -W "ignore:pkg_resources is deprecated" tools/demo.py

# pytest over both cores, test by test (a file whose module fixture writes files stays on one worker),
# and the expensive session fixtures shared by the workers (tests/conftest.py).
XDIST ?= -n 2 --dist loadgroup

# The whole suite on the pinned stack, then the compatibility job, then the
# whole suite again on the users' stack.
test: setup
	$(PY) -m pytest tests $(XDIST) -q -ra --durations=15
	$(MAKE) --no-print-directory test-compat
	$(MAKE) --no-print-directory test-users

# The whole suite on the stack mmdet 3.x users have (Python 3.10, torch 2.1.2,
# numpy 1.26, mmcv 2.1.0 with ops: requirements/users.txt) in .venv-users,
# orepa_mm installed on top with the README's `pip install -e .`.
test-users:
	bash scripts/test_users_stack.sh $(XDIST) --durations=15

# The library tests at the ends of the ranges: the oldest stack (Python 3.8,
# torch 2.1, numpy 1.24, mmengine 0.10.0) in .venv-compat, and numpy 2 on
# Python 3.12 with the oldest torch that runs with it, in .venv-compat-numpy2.
test-compat:
	bash scripts/test_compat.sh oldest
	bash scripts/test_compat.sh numpy2

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
