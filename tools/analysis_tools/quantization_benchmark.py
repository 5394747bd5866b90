"""fp32 against INT8 for the accuracy benchmark's trained toy models: plain,
DBB and OREPA over their seeds, each checked by ``quantization_check.py``.

    python tools/analysis_tools/quantization_benchmark.py --runs-dirs work_dirs/accuracy_benchmark/runs \\
        --tasks segmentor --variants plain dbb orepa --seeds 0 1 2 --out-dir work_dirs/quantization_benchmark

Each run folder ``<runs-dir>/<task>/<variant>/seed<N>`` that
``accuracy_benchmark.py`` wrote holds the run's own config and final
checkpoint; this tool quantizes and evaluates it (its report lands in
``<out-dir>/<task>/<variant>/seed<N>``; an existing report is reused) and
writes ``quantization_benchmark.{json,md}``: per task and variant the task's
metric in fp32 and INT8 and the drop, mean ± std over the seeds, and the
largest outlier ratio and mean INT8 weight error of the fused kernels.
Several ``--runs-dirs`` are searched in order (e.g. the baselines' and the
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

from quantization_check import quantization_check  # noqa: E402

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


def check_run(path: str, out_dir: str, calib_batches: int) -> Dict[str, Any]:
    report_path = osp.join(out_dir, 'quantization_check.json')
    if osp.isfile(report_path):
        with open(report_path) as f:
            return json.load(f)
    checkpoints = sorted(glob.glob(osp.join(path, 'iter_*.pth')), key=lambda p: int(p.rsplit('_', 1)[1][:-4]))
    if not checkpoints:
        raise ToolError(f'{path} has no checkpoint')
    return quantization_check(osp.join(path, 'config.py'), checkpoints[-1], out_dir, calib_batches)


def mean_std(values: List[float]) -> str:
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}'


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    rows, results = [], {}
    todo = [(t, v, s) for t in args.tasks for s in args.seeds for v in args.variants]
    for i, (task, variant, seed) in enumerate(todo, 1):
        log(f'[{i}/{len(todo)}] {task} {variant} seed {seed}')
        path = run_dir(args.runs_dirs, task, variant, seed)
        report = check_run(path, osp.join(args.out_dir, task, variant, f'seed{seed}'), args.calib_batches)
        key = TOY_JOBS[task].metric
        fp32, int8 = (metric_value(report[p], key, f'{path} ({p})')[0] for p in ('fp32', 'int8'))
        results.setdefault(task, {}).setdefault(variant, []).append(dict(
            seed=seed, run=path, fp32=fp32, int8=int8, drop=fp32 - int8,
            **{k: report[k] for k in ('worst_outlier_ratio', 'mean_int8_weight_error')}))
    header = ['| task | variant | metric | fp32 | INT8 | drop (fp32 - INT8) | per seed drop | worst outlier ratio '
              '| mean INT8 weight error |', '|---|---|---|---|---|---|---|---|---|']
    for task, by_variant in results.items():
        for variant, runs in by_variant.items():
            rows.append(f'| {task} | {variant} | {TOY_JOBS[task].metric_name} | '
                        f'{mean_std([r["fp32"] for r in runs])} | {mean_std([r["int8"] for r in runs])} | '
                        f'{mean_std([r["drop"] for r in runs])} | '
                        f'{", ".join(format(r["drop"], "+.3f") for r in runs)} | '
                        f'{max(r["worst_outlier_ratio"] for r in runs):.1f} | '
                        f'{statistics.mean(r["mean_int8_weight_error"] for r in runs):.2e} |')
    table = '\n'.join(header + rows) + '\n'
    atomic_write_text(osp.join(args.out_dir, 'quantization_benchmark.json'), json.dumps(results, indent=1))
    atomic_write_text(osp.join(args.out_dir, 'quantization_benchmark.md'), table)
    print(table)


if __name__ == '__main__':
    sys.exit(main())
