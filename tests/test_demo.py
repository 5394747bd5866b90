"""The main job, ``make demo``'s ``tools/demo.py``, as a smoke run (2 iterations
per model): it trains, evaluates and fuses both toy models, prints its table,
and keeps the console readable (no per-parameter optimizer lines, no config
dump, no Python warnings: those go to the log files).  Like ``make demo`` it
generates the toy data under the repository's ``data/toy`` (git-ignored) if
it is not there."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


def test_demo_trains_fuses_and_prints_a_readable_table(tmp_path):
    out = run([sys.executable, '-W', 'ignore:pkg_resources is deprecated', str(ROOT / 'tools/demo.py'),
               '--max-iters', '2', '--work-dir', str(tmp_path / 'demo')], cwd=ROOT, env={'OMP_NUM_THREADS': '1'})
    console = out.stdout + out.stderr
    assert '==== orepa_mm demo' in console
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(('detector ', 'segmentor '))]
    assert [(r[0], r[1]) for r in rows] == [('detector', 'coco/bbox_mAP'), ('segmentor', 'mIoU')], out.stdout
    for row in rows:
        assert row[2] == row[3], row  # the fused model scores what the unfused one does
        assert float(row[-1]) <= 1e-5 and int(row[-2]) > 0
    for noise in ('paramwise_options', 'Warning', 'Config:', 'System environment'):
        assert noise not in console, noise
    logs = list((tmp_path / 'demo').rglob('*.log'))
    assert any('paramwise_options' in p.read_text() for p in logs)  # the file keeps what the console drops
    # mmseg warns while the segmentor's Runner is built: into the segmentor's own log.
    assert any('UserWarning' in p.read_text() for p in (tmp_path / 'demo' / 'segmentor').rglob('*.log'))
    assert len(console.splitlines()) < 40, console
