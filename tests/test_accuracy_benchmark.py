"""tools/analysis_tools/accuracy_benchmark.py: a two-iteration run of the toy
detector (plain and OREPA, real Runner, dataset and CocoMetric), its reports,
the resumption of a finished run, determinism given a seed, and bad input."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from orepa_mm.toy_data.jobs import metric_value

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'analysis_tools' / 'accuracy_benchmark.py'


def _tool():
    spec = importlib.util.spec_from_file_location('accuracy_benchmark', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules['accuracy_benchmark'] = module
    spec.loader.exec_module(module)
    return module


def _argv(toy_root: Path, out: Path, variants: list) -> list:
    return ['--tasks', 'detector', '--variants', *variants, '--seeds', '0', '--max-iters', '2',
            '--data-dir', str(toy_root / 'data' / 'toy'), '--out-dir', str(out)]


@pytest.fixture(scope='module')
def bench(toy_root: Path, tmp_path_factory) -> Dict[str, Any]:
    """One benchmark of the detector (plain, OREPA; seed 0), then the same command again."""
    tool = _tool()
    out = tmp_path_factory.mktemp('accuracy')
    assert tool.main(_argv(toy_root, out, ['plain', 'orepa'])) == 0
    first = json.loads((out / 'accuracy_benchmark.json').read_text())
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('runs/detector/*/seed0/result.json')}
    assert tool.main(_argv(toy_root, out, ['plain', 'orepa'])) == 0
    second = json.loads((out / 'accuracy_benchmark.json').read_text())
    return dict(tool=tool, out=out, first=first, second=second, stamps=stamps)


def test_reports(bench: Dict[str, Any]) -> None:
    report, out = bench['first'], bench['out']
    assert set(report) == {'metadata', 'config', 'summary', 'runs'}
    for key in ('command', 'git_commit', 'versions', 'device', 'cpu', 'date'):
        assert key in report['metadata']
    assert report['metadata']['versions']['mmdet'] and report['metadata']['versions']['torch']
    assert report['config']['seeds'] == [0] and report['config']['iters'] == {'detector': 2}
    runs = report['runs']
    assert [(r['task'], r['variant'], r['seed']) for r in runs] == [('detector', 'plain', 0), ('detector', 'orepa', 0)]
    for run in runs:
        assert run['iters'] == 2 and len(run['losses']) == 2 and run['metric_key'] == 'coco/bbox_mAP'
        assert 0.0 <= run['metric'] <= 1.0 and run['train_time_s'] > 0 and run['peak_rss_bytes'] > 1e8
        assert not run['reused']
    entry = report['summary']['detector']['orepa']
    assert entry['metric']['n'] == 1 and entry['metric']['std'] is None
    assert entry['metric']['per_seed'] == {'0': runs[1]['metric']}
    assert entry['peak_rss_bytes']['mean'] == runs[1]['peak_rss_bytes']

    md = (out / 'accuracy_benchmark.md').read_text()
    rows = [line for line in md.splitlines() if line.startswith('| detector')]
    assert len(rows) == 2 and '| bbox mAP |' in rows[0] and rows[1].startswith('| detector | orepa |')
    assert '| task | variant | metric | mean ± std | Δ vs plain | per seed (0) | train time | peak RSS |' in md
    assert (out / 'accuracy_benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_resume_reuses_finished_runs(bench: Dict[str, Any]) -> None:
    assert all(r['reused'] for r in bench['second']['runs'])
    assert {p: p.stat().st_mtime_ns for p in bench['stamps']} == bench['stamps']  # not retrained
    for first, second in zip(bench['first']['runs'], bench['second']['runs']):
        assert first['metric'] == second['metric'] and first['losses'] == second['losses']


def test_same_seed_same_result(bench: Dict[str, Any], toy_root: Path, tmp_path: Path) -> None:
    """The same seed trained again in another work dir gives the same losses and metric."""
    assert bench['tool'].main(_argv(toy_root, tmp_path, ['plain'])) == 0
    again = json.loads((tmp_path / 'accuracy_benchmark.json').read_text())['runs'][0]
    first = bench['first']['runs'][0]
    assert not again['reused'] and again['run_dir'] != first['run_dir']
    assert again['losses'] == first['losses'] and again['metric'] == first['metric']


@pytest.mark.parametrize('argv, message', [
    (['--variants', 'plain', 'resnet'], "unknown variant 'resnet'; expected one of plain, dbb, orepa"),
    (['--tasks', 'tracker'], "unknown task 'tracker'"),
    (['--seeds', '0', '0'], '--seeds must be distinct'),
])
def test_bad_input_exits_2(argv: list, message: str, tmp_path: Path, capsys) -> None:
    tool = _tool()
    assert tool.main(argv + ['--out-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('accuracy_benchmark: error: ') and message in err[0]
    assert not any(tmp_path.iterdir())


def test_metric_value_counts_an_empty_evaluation_as_zero_and_refuses_a_missing_key() -> None:
    assert metric_value({'coco/bbox_mAP': 0.25, 'coco/bbox_mAP_50': 0.5}, 'coco/bbox_mAP', 'det') == (0.25, None)
    value, note = metric_value({}, 'coco/bbox_mAP', 'det')
    assert value == 0.0 and 'no predictions' in note
    with pytest.raises(KeyError, match="det: the evaluation gave no 'mIoU'"):
        metric_value({'aAcc': 90.0}, 'mIoU', 'det')


def test_quantization_benchmark_on_the_benchmarks_runs(bench: Dict[str, Any]) -> None:
    """quantization_benchmark.py quantizes each trained run (fp32 vs INT8 with CocoMetric) and tabulates them."""
    spec = importlib.util.spec_from_file_location('quantization_benchmark', SCRIPT.parent / 'quantization_benchmark.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = bench['out'] / 'quantization'
    argv = ['--runs-dirs', str(bench['out'] / 'runs'), '--tasks', 'detector', '--variants', 'plain', 'orepa',
            '--seeds', '0', '--calib-batches', '2', '--calibrations', 'minmax', 'percentile', '--out-dir', str(out)]
    assert tool.main(argv) == 0
    report = json.loads((out / 'quantization_benchmark.json').read_text())
    results = report['detector']
    assert set(results) == {'plain', 'orepa'}
    for runs in results.values():
        (run, ) = runs
        assert run['drop'] == pytest.approx(run['fp32'] - run['int8']) and 0 < run['mean_int8_weight_error'] < 0.05
        assert set(run['by_calibration']) == {'minmax', 'percentile'}
        assert run['by_calibration']['minmax']['drop'] == run['drop']
    pair = report['paired_against_plain']['detector']['percentile']['orepa']
    assert pair['per_seed']['0'] == pytest.approx(results['orepa'][0]['by_calibration']['percentile']['drop']
                                                  - results['plain'][0]['by_calibration']['percentile']['drop'])
    table = (out / 'quantization_benchmark.md').read_text()
    assert '| detector | minmax | plain | bbox mAP |' in table
    assert '| detector | percentile | orepa | bbox mAP |' in table
    assert '| detector | percentile | orepa | ' in table.split('Paired on the seeds')[1]
    assert tool.main(argv[:-2] + ['--seeds', '1', '--out-dir', str(out)]) == 2  # no such run: one clear error
