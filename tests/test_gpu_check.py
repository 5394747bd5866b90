"""The GPU check's dry run on the CPU (``gpu_check.sh OUT --cpu``): every step of
the check runs at tiny sizes (its tests narrowed to one small file here), the
summary is written and the exit status is 0; the TensorRT step says it skipped."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / 'gpu_check'
    proc = run(['bash', str(ROOT / 'tools/analysis_tools/gpu_check.sh'), str(out), '--cpu'], cwd=ROOT, env={
        'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1',
        'GPU_CHECK_TESTS': 'tests/test_mmdeploy_rewrites.py -m core'}, timeout=900)
    console = proc.stdout + proc.stderr
    assert json.loads((out / 'environment.json').read_text())['mode'] == 'cpu-dry-run'
    assert 'passed' in (out / 'tests.txt').read_text()
    assert list((out / 'bench').glob('benchmark_*.json')), console[-2000:]
    sweep = json.loads((out / 'sweep' / 'sweep_resnet18_64.json').read_text())
    assert [p['batch'] for p in sweep['points']] == [2, 3] and 'orepa' in sweep['fit']['model']
    assert (out / 'gpu_check.md').is_file() and (out / 'gpu_check.json').is_file()
    assert 'deploy: skipped' in console
