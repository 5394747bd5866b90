"""Summarise a GPU check's output folder (``gpu_check.sh``) as JSON and Markdown.

    python tools/analysis_tools/gpu_check_report.py OUT_DIR

Reads the benchmark reports under ``OUT_DIR/bench/`` and the test results in
``OUT_DIR/tests.xml`` (pytest's JUnit XML) and writes ``OUT_DIR/gpu_check.json``
and ``OUT_DIR/gpu_check.md``: one row per workload, batch size, precision and
generation mode (eager or replayed from recordings) with the plain step time
and the DBB and OREPA ratios to it (step time, CUDA peak memory, operators per
step), then the test counts (the CUDA cases apart) and the targets: OREPA /
plain step time <= 1.10 (goal 1.05) at batch 2 in float32 and under AMP,
CUDA peak memory <= 1.05.
"""
from __future__ import annotations

import argparse
import glob
import json
import os.path as osp
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from orepa_mm.checkpoint import atomic_write_text  # noqa: E402
from orepa_mm.cli import ToolError, log, tool_main  # noqa: E402

PROG = 'gpu_check_report'
STEP_TARGET, STEP_GOAL, MEMORY_TARGET = 1.10, 1.05, 1.05


def _ratio(results: Dict[str, Any], variant: str, key: str) -> Optional[float]:
    value = results.get('ratios', {}).get(variant, {}).get(key)
    return None if value is None else round(value, 3)


def benchmark_rows(bench_dir: str) -> List[Dict[str, Any]]:
    """One row per (report, workload): the figures the summary tabulates."""
    rows = []
    for path in sorted(glob.glob(osp.join(bench_dir, 'benchmark_*.json'))):
        with open(path) as f:
            report = json.load(f)
        cfg, meta = report['config'], report['metadata']
        precision = meta.get('amp') or 'float32'
        for workload, results in report['results'].items():
            plain = results['variants'].get(results['baseline'], {})
            rows.append(dict(
                workload=workload, batch_size=cfg['batch_size'], input_size=cfg['input_size'], precision=precision,
                generation='replayed' if cfg.get('capture', 'off') != 'off' else 'eager',
                capture=cfg.get('capture', 'off'), device=meta.get('device_name') or meta.get('device'),
                plain_step_ms=round(plain['train_step_s']['median'] * 1e3, 2) if 'train_step_s' in plain else None,
                orepa_step=_ratio(results, 'orepa', 'train_step_s'), dbb_step=_ratio(results, 'dbb', 'train_step_s'),
                orepa_cuda_peak=_ratio(results, 'orepa', 'cuda_max_allocated_bytes'),
                dbb_cuda_peak=_ratio(results, 'dbb', 'cuda_max_allocated_bytes'),
                orepa_ops=results['variants'].get('orepa', {}).get('train_ops'),
                plain_ops=plain.get('train_ops'), report=osp.basename(path)))
    return rows


def test_counts(xml_path: str) -> Dict[str, Any]:
    """Passed/failed/skipped counts of a JUnit XML file, all and CUDA cases (``[...cuda...]`` ids)."""
    if not osp.isfile(xml_path):
        return dict(found=False)
    counts = {scope: dict(passed=0, failed=0, skipped=0) for scope in ('all', 'cuda')}
    failed_names = []
    for case in ET.parse(xml_path).getroot().iter('testcase'):
        if case.find('skipped') is not None:
            outcome = 'skipped'
        elif case.find('failure') is not None or case.find('error') is not None:
            outcome = 'failed'
            failed_names.append(f'{case.get("classname")}::{case.get("name")}')
        else:
            outcome = 'passed'
        counts['all'][outcome] += 1
        if 'cuda' in (case.get('name') or ''):
            counts['cuda'][outcome] += 1
    return dict(found=True, **counts, failed_tests=failed_names)


def targets(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, checked on the batch-2 rows of the torchvision Faster R-CNN."""
    checks = []
    for row in rows:
        if row['workload'] != 'tv-faster-rcnn' or row['batch_size'] != 2:
            continue
        step, peak = row['orepa_step'], row['orepa_cuda_peak']
        checks.append(dict(precision=row['precision'], generation=row['generation'], orepa_step=step,
                           step_ok=step is not None and step <= STEP_TARGET,
                           step_goal=step is not None and step <= STEP_GOAL,
                           orepa_cuda_peak=peak, memory_ok=peak is not None and peak <= MEMORY_TARGET))
    return checks


def _fmt(value: Any, suffix: str = '') -> str:
    return '-' if value is None else f'{value}{suffix}'


def markdown(summary: Dict[str, Any]) -> str:
    meta = summary['environment']
    lines = [f'# GPU check: {meta.get("device", "?")}', '',
             f'- commit {meta.get("git_commit", "?")}, torch {meta.get("torch", "?")}, '
             f'wall time {summary.get("wall_time_s", "?")} s', '',
             '| workload | batch | input | precision | generation | plain step | DBB / plain | OREPA / plain '
             '| DBB peak mem | OREPA peak mem | OREPA ops/step (plain) |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in summary['benchmarks']:
        lines.append(f'| {r["workload"]} | {r["batch_size"]} | {r["input_size"][0]}x{r["input_size"][1]} '
                     f'| {r["precision"]} | {r["generation"]} | {_fmt(r["plain_step_ms"], " ms")} '
                     f'| {_fmt(r["dbb_step"], "x")} | {_fmt(r["orepa_step"], "x")} | {_fmt(r["dbb_cuda_peak"], "x")} '
                     f'| {_fmt(r["orepa_cuda_peak"], "x")} | {_fmt(r["orepa_ops"])} ({_fmt(r["plain_ops"])}) |')
    tests = summary['tests']
    lines += ['', '## Tests (`pytest --core`)', '']
    if tests.get('found'):
        for scope in ('all', 'cuda'):
            c = tests[scope]
            lines.append(f'- {scope} cases: {c["passed"]} passed, {c["failed"]} failed, {c["skipped"]} skipped')
        lines += [f'  - failed: `{name}`' for name in tests['failed_tests']]
    else:
        lines.append('- no test results (tests.xml missing)')
    lines += ['', f'## Targets (torchvision Faster R-CNN R50-FPN, batch 2): OREPA / plain step <= {STEP_TARGET} '
              f'(goal {STEP_GOAL}), CUDA peak memory <= {MEMORY_TARGET}', '']
    for t in summary['targets']:
        lines.append(f'- {t["precision"]}, {t["generation"]}: step {_fmt(t["orepa_step"], "x")} '
                     f'({"met" if t["step_ok"] else "missed"}{", goal met" if t["step_goal"] else ""}), '
                     f'peak memory {_fmt(t["orepa_cuda_peak"], "x")} ({"met" if t["memory_ok"] else "missed"})')
    if not summary['targets']:
        lines.append('- no batch-2 tv-faster-rcnn rows (a CPU dry run measures other workloads)')
    return '\n'.join(lines) + '\n'


def summarise(out_dir: str) -> Dict[str, Any]:
    """The summary of ``out_dir``; writes ``gpu_check.json`` and ``gpu_check.md`` there."""
    if not osp.isdir(out_dir):
        raise ToolError(f'{out_dir}: no such folder (run tools/analysis_tools/gpu_check.sh first)')
    env_path = osp.join(out_dir, 'environment.json')
    environment = json.load(open(env_path)) if osp.isfile(env_path) else {}
    rows = benchmark_rows(osp.join(out_dir, 'bench'))
    summary = dict(environment=environment, benchmarks=rows, tests=test_counts(osp.join(out_dir, 'tests.xml')),
                   targets=targets(rows))
    timing = osp.join(out_dir, 'wall_time_s')
    if osp.isfile(timing):
        summary['wall_time_s'] = float(open(timing).read().strip() or 0)
    atomic_write_text(osp.join(out_dir, 'gpu_check.json'), json.dumps(summary, indent=2) + '\n')
    atomic_write_text(osp.join(out_dir, 'gpu_check.md'), markdown(summary))
    return summary


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Write the summary of the folder that ``argv`` names and print it."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('out_dir', help='the folder gpu_check.sh wrote')
    args = parser.parse_args(argv)
    summary = summarise(args.out_dir)
    print(markdown(summary), end='', flush=True)
    log(f'wrote {osp.join(args.out_dir, "gpu_check.json")} and gpu_check.md')


if __name__ == '__main__':
    raise SystemExit(main())
