"""The code base stays ruff-clean (rules in pyproject.toml)."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', 'orepa_mm', 'tools', 'tests', 'configs'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
