"""fp32 against INT8 for the accuracy benchmark's trained toy models: plain,
DBB and OREPA over their seeds, each checked by ``quantization_check.py``.

    python tools/analysis_tools/quantization_benchmark.py --runs-dirs work_dirs/accuracy_benchmark/runs \\
        --tasks segmentor --variants plain dbb orepa --seeds 0 1 2 --out-dir work_dirs/quantization_benchmark

Each run folder ``<runs-dir>/<task>/<variant>/seed<N>`` that
``accuracy_benchmark.py`` wrote holds the run's own config and final
checkpoint; this tool quantizes and evaluates it (its report lands in
``<out-dir>/<task>/<variant>/seed<N>``; an existing report is reused) and
writes ``quantization_benchmark.{json,md}``: per task, calibration method
(``--calibrations``, ONNX Runtime's min/max, percentile and entropy) and
variant the task's metric in fp32 and INT8 and the drop, mean ± std over the
seeds and per seed, the largest outlier ratio and mean INT8 weight error of
the fused kernels; and the paired comparison: per seed, each variant's drop
minus plain's drop on the same seed, with its mean ± std.  Several
``--runs-dirs`` are searched in order (e.g. the baselines' and the
ablations' benchmarks).
"""
from __future__ import annotations

import argparse
import glob
import json
import os.path as osp
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
for _path in (REPO, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from quantization_check import CALIBRATIONS, quantization_check  # noqa: E402

from orepa_mm.checkpoint import atomic_write_text  # noqa: E402
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, log, tool_main  # noqa: E402
from orepa_mm.toy_data.jobs import TOY_JOBS, metric_value  # noqa: E402

PROG = 'quantization_benchmark'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--runs-dirs', nargs='+', default=[osp.join('work_dirs', 'accuracy_benchmark', 'runs')])
    parser.add_argument('--tasks', nargs='+', default=list(TOY_JOBS))
    parser.add_argument('--variants', nargs='+', default=['plain', 'dbb', 'orepa'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--calib-batches', type=int, default=16)
    parser.add_argument('--calibrations', nargs='+', default=['minmax'], choices=list(CALIBRATIONS),
                        help='calibration methods, each measured on every run (the first is the "drop" column '
                             'of the JSON)')
    parser.add_argument('--out-dir', default=osp.join('work_dirs', 'quantization_benchmark'))
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TOY_JOBS]
    if unknown:
        raise ToolError(f'unknown task {unknown[0]!r}; expected one of {", ".join(TOY_JOBS)}')
    return args


def run_dir(runs_dirs: Sequence[str], task: str, variant: str, seed: int) -> str:
    for root in runs_dirs:
        path = osp.join(root, task, variant, f'seed{seed}')
        if osp.isfile(osp.join(path, 'result.json')):
            return path
    raise ToolError(f'no finished run of {task} {variant} seed {seed} in {", ".join(runs_dirs)} '
                    '(train it with accuracy_benchmark.py)')


def check_run(path: str, out_dir: str, calib_batches: int, calibrations: Sequence[str]) -> Dict[str, Any]:
    """The run's check report: an existing one with these settings, else a new one."""
    report_path = osp.join(out_dir, 'quantization_check.json')
    if osp.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        methods = report.get('by_calibration', {'minmax': None})
        if report.get('calib_batches') == calib_batches and all(c in methods for c in calibrations):
            return report
    checkpoints = sorted(glob.glob(osp.join(path, 'iter_*.pth')), key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
    if not checkpoints:
        raise ToolError(f'{path} has no checkpoint')
    return quantization_check(osp.join(path, 'config.py'), checkpoints[-1], out_dir, calib_batches,
                              calibrations=calibrations)


def mean_std(values: List[float]) -> str:
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}'


def drops_by_method(report: Dict[str, Any], key: str, source: str, calibrations: Sequence[str]) -> Dict[str, Any]:
    """``{method: (int8, drop)}`` of the task's metric for each calibration method of a check report."""
    fp32 = metric_value(report['fp32'], key, f'{source} (fp32)')[0]
    by_method = report.get('by_calibration') or {'minmax': dict(int8=report['int8'])}
    out = {}
    for method in calibrations:
        int8 = metric_value(by_method[method]['int8'], key, f'{source} (INT8, {method})')[0]
        out[method] = dict(int8=int8, drop=fp32 - int8)
    return out


def paired(runs: List[Dict[str, Any]], baseline: List[Dict[str, Any]], method: str) -> Dict[str, Any]:
    """Per seed in both, the run's drop minus the baseline's drop with ``method``; mean and std."""
    base = {r['seed']: r['by_calibration'][method]['drop'] for r in baseline}
    diffs = {r['seed']: r['by_calibration'][method]['drop'] - base[r['seed']] for r in runs if r['seed'] in base}
    values = list(diffs.values())
    return dict(per_seed=diffs, mean=statistics.mean(values) if values else None,
                std=statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(results: Dict[str, Any], calibrations: Sequence[str]) -> str:
    """The tables: per method and variant, then the paired differences against plain."""
    lines = ['| task | calibration | variant | metric | fp32 | INT8 | drop (fp32 - INT8) | per seed drop '
             '| worst outlier ratio | mean INT8 weight error |', '|---|---|---|---|---|---|---|---|---|---|']
    pairs = ['| task | calibration | variant | drop - plain\'s drop, mean ± std | per seed |', '|---|---|---|---|---|']
    for task, by_variant in results.items():
        for method in calibrations:
            for variant, runs in by_variant.items():
                drops = [r['by_calibration'][method]['drop'] for r in runs]
                lines.append(
                    f'| {task} | {method} | {variant} | {TOY_JOBS[task].metric_name} | '
                    f'{mean_std([r["fp32"] for r in runs])} | '
                    f'{mean_std([r["by_calibration"][method]["int8"] for r in runs])} | {mean_std(drops)} | '
                    f'{", ".join(format(d, "+.3f") for d in drops)} | '
                    f'{max(r["worst_outlier_ratio"] for r in runs):.1f} | '
                    f'{statistics.mean(r["mean_int8_weight_error"] for r in runs):.2e} |')
                if variant != 'plain' and 'plain' in by_variant:
                    pair = paired(runs, by_variant['plain'], method)
                    if pair['mean'] is not None:
                        pairs.append(f'| {task} | {method} | {variant} | {pair["mean"]:+.3f} ± {pair["std"]:.3f} | '
                                     + ', '.join(f'{s}: {d:+.3f}' for s, d in pair['per_seed'].items()) + ' |')
    text = '\n'.join(lines) + '\n'
    if len(pairs) > 2:
        text += '\nPaired on the seeds (positive: the variant loses more than plain):\n\n' + '\n'.join(pairs) + '\n'
    return text


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    todo = [(t, v, s) for t in args.tasks for s in args.seeds for v in args.variants]
    for i, (task, variant, seed) in enumerate(todo, 1):
        log(f'[{i}/{len(todo)}] {task} {variant} seed {seed}')
        path = run_dir(args.runs_dirs, task, variant, seed)
        report = check_run(path, osp.join(args.out_dir, task, variant, f'seed{seed}'), args.calib_batches,
                           args.calibrations)
        key = TOY_JOBS[task].metric
        fp32 = metric_value(report['fp32'], key, f'{path} (fp32)')[0]
        by_method = drops_by_method(report, key, path, args.calibrations)
        first = by_method[args.calibrations[0]]
        results.setdefault(task, {}).setdefault(variant, []).append(dict(
            seed=seed, run=path, fp32=fp32, int8=first['int8'], drop=first['drop'], by_calibration=by_method,
            **{k: report[k] for k in ('worst_outlier_ratio', 'mean_int8_weight_error')}))
    summary = {task: {method: {v: paired(runs, by_variant['plain'], method)
                               for v, runs in by_variant.items() if v != 'plain' and 'plain' in by_variant}
                      for method in args.calibrations} for task, by_variant in results.items()}
    table = markdown(results, args.calibrations)
    atomic_write_text(osp.join(args.out_dir, 'quantization_benchmark.json'),
                      json.dumps(dict(results, paired_against_plain=summary), indent=1))
    atomic_write_text(osp.join(args.out_dir, 'quantization_benchmark.md'), table)
    print(table)


if __name__ == '__main__':
    sys.exit(main())
