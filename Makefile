# The README's two commands: `make demo` and `make test`.  Both set up .venv
# first (idempotent, fast when already done).
PY := .venv/bin/python

.PHONY: setup demo test lint benchmark
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -W "ignore:pkg_resources is deprecated" tools/demo.py

test: setup
	$(PY) -m pytest tests -q -ra --durations=15

lint: setup
	$(PY) -m ruff check orepa_mm tools tests configs

benchmark: setup
	$(PY) tools/analysis_tools/benchmark.py
