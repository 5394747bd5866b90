"""Accuracy of plain, DBB and OREPA models on the toy tasks, over several seeds.

    python tools/analysis_tools/accuracy_benchmark.py --tasks detector segmentor classifier \\
        --variants plain dbb orepa --seeds 0 1 2 --out-dir work_dirs/accuracy_benchmark

Trains every toy task of ``orepa_mm.toy_data.jobs.TOY_JOBS`` (the detector,
the segmentor and the classifier) in every variant with the same seeded schedule, once per
seed, each run with mmengine's Runner in a process of its own (so that its
memory peak is its own), deterministic given the seed (mmengine's
``randomness`` with ``deterministic=True``, and the training sampler's seed,
which fixes the data order).  Runs go seed by seed, the variants alternating,
so that partial results compare like with like.

Reports per task and variant the mean and standard deviation over the seeds
of the task's metric (bbox mAP, mIoU, top-1), of the training time and of the peak
memory (resident set of the run's process; on CUDA also
``torch.cuda.max_memory_allocated``), and every seed's value: JSON (all runs,
the summary, metadata), Markdown and a PNG chart in ``--out-dir``; the table
is printed at the end.  Each run's files (its config, the Runner's log, the
console output, ``result.json``) are in ``<work-dir>/<task>/<variant>/seed<N>``;
a run whose ``result.json`` matches its config, seed, device and data is
reused, so an interrupted benchmark continues where it stopped.  The toy
data is created in ``--data-dir`` if missing.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
for _path in (REPO, osp.dirname(osp.abspath(__file__))):  # orepa_mm from a checkout; benchmark_lib when imported
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmark_lib import accuracy as acc  # noqa: E402
from benchmark_lib import report as rep  # noqa: E402

from orepa_mm.checkpoint import atomic_write, atomic_write_text  # noqa: E402
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, log, tool_main  # noqa: E402
from orepa_mm.toy_data.jobs import ABLATION_VARIANTS, TOY_JOBS, TOY_VARIANTS  # noqa: E402

PROG = 'accuracy_benchmark'
WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'benchmark_lib', 'accuracy_worker.py')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); unknown names are a :class:`ToolError`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--tasks', nargs='+', default=list(TOY_JOBS), help=f'of: {", ".join(TOY_JOBS)}')
    parser.add_argument('--variants', nargs='+', default=list(TOY_VARIANTS),
                        help=f'of: {", ".join(TOY_VARIANTS + ABLATION_VARIANTS)} (the ablations: for the tasks '
                        'that have them); the first is the baseline of the Δ column')
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument('--seeds', nargs='+', type=int, default=None, help='the seeds (default: 0 1 2)')
    seeds.add_argument('--num-seeds', type=int, default=None, help='seeds 0 .. N-1')
    parser.add_argument('--max-iters', type=int, default=None,
                        help="override the configs' training iterations (smoke runs; the schedules keep their "
                        'milestones)')
    parser.add_argument('--out-dir', default=osp.join('work_dirs', 'accuracy_benchmark'),
                        help='where the JSON, Markdown and PNG go')
    parser.add_argument('--work-dir', default=None, help='the runs\' folders (default: <out-dir>/runs)')
    parser.add_argument('--data-dir', default=osp.join(REPO, 'data', 'toy'),
                        help='the toy data (created here if missing)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None,
                        help='None: cuda when available, else cpu')
    args = parser.parse_args(argv)
    for what, given, known in (('task', args.tasks, list(TOY_JOBS)),
                               ('variant', args.variants, TOY_VARIANTS + ABLATION_VARIANTS)):
        unknown = [name for name in given if name not in known]
        if unknown:
            raise ToolError(f'unknown {what} {unknown[0]!r}; expected one of {", ".join(known)}')
        if len(set(given)) != len(given):
            raise ToolError(f'--{what}s must not repeat')
    for task in args.tasks:
        missing = [v for v in args.variants if v not in TOY_JOBS[task].variants]
        if missing:
            raise ToolError(f'the {task} has no config for variant {missing[0]!r} (its variants: '
                            f'{", ".join(TOY_JOBS[task].variants)})')
    if args.num_seeds is not None and args.num_seeds < 1:
        raise ToolError('--num-seeds must be >= 1')
    args.seeds = args.seeds if args.seeds is not None else list(range(args.num_seeds or 3))
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ToolError('--seeds must be distinct non-negative integers')
    if args.max_iters is not None and args.max_iters < 1:
        raise ToolError('--max-iters must be >= 1')
    args.work_dir = args.work_dir or osp.join(args.out_dir, 'runs')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ToolError('--device cuda: CUDA is not available')
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    return args


def prepare_run(spec: acc.RunSpec, args: argparse.Namespace, device: str, fingerprints: Dict[str, str]
                ) -> Dict[str, Any]:
    """Write the run's config into its folder; return where things are and its cache key."""
    from orepa_mm.config import load_config

    job = TOY_JOBS[spec.task]
    run_dir = osp.abspath(osp.join(args.work_dir, spec.task, spec.variant, f'seed{spec.seed}'))
    try:
        with warnings.catch_warnings():  # the frameworks' import-time deprecation warnings; each run's log has them
            warnings.simplefilter('ignore')
            cfg = acc.run_config(load_config(osp.join(REPO, job.config(spec.variant))), args.data_dir, run_dir,
                                 spec.seed, args.max_iters)
    except ValueError as err:
        raise ToolError(str(err)) from err
    config_path = osp.join(run_dir, 'config.py')
    atomic_write(config_path, cfg.dump)
    with open(config_path) as f:
        text = f.read().replace(run_dir, '<run_dir>')  # where a run lives does not change its result
    data_root = cfg.train_dataloader.dataset.get('data_root') or args.data_dir
    if data_root not in fingerprints:
        fingerprints[data_root] = acc.data_fingerprint(data_root)
    return dict(run_dir=run_dir, config=config_path, result=osp.join(run_dir, 'result.json'),
                iters=cfg.train_cfg.max_iters,
                key=acc.cache_key(text, spec.seed, device, fingerprints[data_root]))


def stored_result(paths: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The run's stored result if its key matches, else None."""
    try:
        with open(paths['result']) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if result.get('key') == paths['key'] else None


def train_run(spec: acc.RunSpec, paths: Dict[str, Any], device: str) -> Dict[str, Any]:
    """Train one run in a process of its own (its console output to ``console.log``); return its result."""
    job = TOY_JOBS[spec.task]
    info = dict(task=spec.task, variant=spec.variant, seed=spec.seed, key=paths['key'],
                config=job.config(spec.variant), metric_key=job.metric, run_dir=paths['run_dir'])
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=':4096:8', PYTHONHASHSEED='0')
    if device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    console = osp.join(paths['run_dir'], 'console.log')
    cmd = [sys.executable, WORKER, '--config', paths['config'], '--result', paths['result'],
           '--metric', job.metric, '--spec', json.dumps(info)]
    with open(console, 'w') as out:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    result = stored_result(paths)
    if rc != 0 or result is None:
        with open(console, errors='replace') as f:
            tail = ''.join(f.readlines()[-25:])
        raise SystemExit(f'{PROG}: {spec.name} failed (exit status {rc}); its output ({console}) ends:\n{tail}')
    return result


def run_all(args: argparse.Namespace, device: str) -> List[Dict[str, Any]]:
    """Train (or reuse) every run in order, logging one line as each starts and ends."""
    specs = acc.plan_runs(args.tasks, args.variants, args.seeds)
    fingerprints: Dict[str, str] = {}
    runs: List[Dict[str, Any]] = []
    durations: Dict[str, List[float]] = {}
    for spec in specs:
        job = TOY_JOBS[spec.task]
        tag = f'[{spec.index}/{len(specs)}] {spec.name}'
        paths = prepare_run(spec, args, device, fingerprints)
        result = stored_result(paths)
        if result is not None:
            log(f'{tag}: reused {job.metric_name} {result["metric"]:.3f} ({result["train_time_s"]:.0f} s of '
                f'training) from {paths["result"]}')
            result['reused'] = True
        else:
            log(f'{tag}: training {paths["iters"]} iterations (log in {paths["run_dir"]})')
            start = time.perf_counter()
            result = train_run(spec, paths, device)
            durations.setdefault(spec.task, []).append(time.perf_counter() - start)
            left = sum(_mean(durations.get(s.task) or sum(durations.values(), [])) for s in specs[spec.index:])
            log(f'{tag}: {job.metric_name} {result["metric"]:.3f}, final loss {result["final_loss"]:.4f} '
                f'({result["train_time_s"]:.0f} s training, {result["wall_s"]:.0f} s in all; '
                f'about {left / 60:.0f} min left)')
            result['reused'] = False
        runs.append(result)
    return runs


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def write_outputs(report: Dict[str, Any], base: str) -> List[str]:
    """Write ``base`` + ``.json``, ``.md`` and (with matplotlib) ``.png`` atomically; return the paths."""
    atomic_write_text(base + '.json', json.dumps(report, indent=1) + '\n')
    atomic_write_text(base + '.md', acc.markdown(report))
    written = [base + '.json', base + '.md']
    if rep.pyplot() is not None:
        atomic_write(base + '.png', lambda tmp: acc.draw_chart(report, tmp))
        written.append(base + '.png')
    return written


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark that ``argv`` asks for."""
    args = parse_args(argv)
    device = args.device
    from orepa_mm.toy_data import StaleToyDataError, ensure_toy_data
    try:
        made = ensure_toy_data(args.data_dir, verbose=False)
    except StaleToyDataError as err:
        raise ToolError(str(err)) from err
    if made:
        log(f'wrote the toy {" and ".join(made)} set(s) into {args.data_dir}')

    start = time.perf_counter()
    meta = rep.metadata(torch.device(device), amp=False)
    meta['git_clean'] = not subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip()
    runs = run_all(args, device)
    meta['wall_time_s'] = round(time.perf_counter() - start, 1)
    meta['load_average_end'] = rep.load_average()
    report = dict(metadata=meta, config=dict(
        tasks=args.tasks, variants=args.variants, seeds=args.seeds, max_iters=args.max_iters, device=device,
        data_dir=osp.abspath(args.data_dir), work_dir=osp.abspath(args.work_dir),
        iters={task: next(r['iters'] for r in runs if r['task'] == task) for task in args.tasks},
        configs={task: TOY_JOBS[task].config_pattern for task in args.tasks},
        metrics={task: TOY_JOBS[task].metric for task in args.tasks},
        metric_names={task: TOY_JOBS[task].metric_name for task in args.tasks}),
        summary=acc.summarise(runs, args.tasks, args.variants), runs=runs)
    written = write_outputs(report, osp.join(args.out_dir, 'accuracy_benchmark'))
    header, rows = acc.table_rows(report)
    print('\n' + rep.text_table(header, rows), flush=True)
    if not written[-1].endswith('.png'):
        log('matplotlib is not installed: no chart drawn (pip install matplotlib)')
    log(f'wrote {", ".join(written)}')


if __name__ == '__main__':
    raise SystemExit(main())
