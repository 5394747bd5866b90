"""The accuracy benchmark's runs and report: run configs and their cache
keys, the per-variant statistics, and the Markdown, text-table and PNG
renderings (``tools/analysis_tools/accuracy_benchmark.py`` drives them)."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from mmengine.config import Config

from .report import fmt_value, markdown_table, pyplot

#: The prefix of the toy configs' data paths (relative to the repository root).
TOY_DATA_PREFIX = 'data/toy/'
#: Per-run figures summarised per variant: (key, column title, kind for :func:`report.fmt_value`).
COST_FIGURES = (('train_time_s', 'train time', 'time'), ('peak_rss_bytes', 'peak RSS', 'bytes'),
                ('cuda_max_allocated_bytes', 'CUDA peak', 'bytes'))


@dataclass(frozen=True)
class RunSpec:
    """One training run: a task's variant with one seed."""
    index: int
    task: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f'{self.task} {self.variant} seed {self.seed}'


def plan_runs(tasks: Iterable[str], variants: Iterable[str], seeds: Iterable[int]) -> List[RunSpec]:
    """Seed-major order, the variants alternating inside each task: after
    every completed seed, all tasks and variants have the same number of runs."""
    order = [(seed, task, variant) for seed in seeds for task in tasks for variant in variants]
    return [RunSpec(i + 1, task, variant, seed) for i, (seed, task, variant) in enumerate(order)]


def _rewrite(value: Any, old: str, new: str) -> Tuple[Any, int]:
    """``value`` with every string that starts with ``old`` starting with ``new``; and how many."""
    if isinstance(value, str):
        return (new + value[len(old):], 1) if value.startswith(old) else (value, 0)
    if isinstance(value, dict):
        pairs = {k: _rewrite(v, old, new) for k, v in value.items()}
        return {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
    if isinstance(value, (list, tuple)):
        pairs_list = [_rewrite(v, old, new) for v in value]
        return type(value)(v for v, _ in pairs_list), sum(n for _, n in pairs_list)
    return value, 0


def run_config(cfg: Config, data_dir: str, work_dir: str, seed: int, max_iters: Optional[int]) -> Config:
    """The config of one run: data read from ``data_dir``, seeded and
    deterministic (mmengine's ``randomness``, and the sampler's seed, which
    fixes the data order), evaluated once at the end of training, its work in
    ``work_dir``; ``max_iters`` (if given) overrides the schedule's length."""
    as_dict, replaced = _rewrite(cfg.to_dict(), TOY_DATA_PREFIX, os.path.abspath(data_dir) + '/')
    if not replaced:
        raise ValueError(f'{cfg.filename}: no path starts with {TOY_DATA_PREFIX!r}; the benchmark reads the toy data')
    out = Config(as_dict, filename=cfg.filename)
    out.work_dir = work_dir
    out.randomness = dict(seed=seed, deterministic=True, diff_rank_seed=False)
    out.train_dataloader.sampler.seed = seed
    if max_iters:
        out.train_cfg.max_iters = max_iters
    out.train_cfg.val_interval = out.train_cfg.max_iters
    out.train_cfg.pop('val_begin', None)
    return out


def data_fingerprint(root: str) -> str:
    """A hash of the names and sizes of the files under ``root``: regenerated data changes the cache key."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(f'{os.path.relpath(path, root)}:{os.path.getsize(path)}\n'.encode())
    return digest.hexdigest()[:16]


def cache_key(config_text: str, seed: int, device: str, data: str) -> str:
    """What a stored result must match to be reused: the run's config (its iterations and seed
    included), the seed, the device and the data."""
    return hashlib.sha256(json.dumps([config_text, seed, device, data]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------
def stats(values: Dict[int, Optional[float]]) -> Optional[Dict[str, Any]]:
    """Mean, sample standard deviation (None for one value), min, max and the values by seed."""
    present = [v for v in values.values() if v is not None]
    if not present:
        return None
    return dict(mean=statistics.fmean(present), std=statistics.stdev(present) if len(present) > 1 else None,
                min=min(present), max=max(present), n=len(present), per_seed={str(k): v for k, v in values.items()})


def summarise(runs: List[Dict[str, Any]], tasks: List[str], variants: List[str]) -> Dict[str, Any]:
    """Per task and variant: statistics of the metric and of each cost figure over the seeds."""
    summary: Dict[str, Any] = {}
    for task in tasks:
        summary[task] = {}
        for variant in variants:
            mine = [r for r in runs if r['task'] == task and r['variant'] == variant]
            entry = dict(metric=stats({r['seed']: r['metric'] for r in mine}))
            for key, _, _ in COST_FIGURES:
                entry[key] = stats({r['seed']: r.get(key) for r in mine})
            summary[task][variant] = entry
    return summary


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def metric_format(report: Dict[str, Any], task: str) -> str:
    """3 decimals for metrics in [0, 1] (bbox mAP), 2 otherwise (mIoU in percent)."""
    values = [r['metric'] for r in report['runs'] if r['task'] == task]
    return '.3f' if all(abs(v) <= 1 for v in values) else '.2f'


def _mean_std(st: Optional[Dict[str, Any]], fmt: str) -> str:
    if st is None:
        return '-'
    return format(st['mean'], fmt) + ('' if st['std'] is None else ' ± ' + format(st['std'], fmt))


def _cost_cell(st: Optional[Dict[str, Any]], kind: str) -> str:
    if st is None:
        return '-'
    cell = fmt_value(st['mean'], kind)
    return cell if st['std'] is None else f'{cell} ± {fmt_value(st["std"], kind)}'


def table_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: one row per task and variant."""
    cfg = report['config']
    cuda = any(r.get('cuda_max_allocated_bytes') for r in report['runs'])
    figures = [f for f in COST_FIGURES if cuda or f[0] != 'cuda_max_allocated_bytes']
    base = cfg['variants'][0]
    seeds = ', '.join(map(str, cfg['seeds']))
    header = (['task', 'variant', 'metric', 'mean ± std', f'Δ vs {base}', f'per seed ({seeds})']
              + [title for _, title, _ in figures])
    rows = []
    for task, by_variant in report['summary'].items():
        fmt = metric_format(report, task)
        base_st = by_variant[base]['metric']
        for variant, entry in by_variant.items():
            st = entry['metric']
            delta = '' if variant == base or not (st and base_st) else format(st['mean'] - base_st['mean'], '+' + fmt)
            per_seed = ', '.join('-' if v is None else format(v, fmt) for v in (st or {}).get('per_seed', {}).values())
            rows.append([task, variant, cfg['metric_names'][task], _mean_std(st, fmt), delta, per_seed or '-']
                        + [_cost_cell(entry[key], kind) for key, _, kind in figures])
    return header, rows


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: settings, the table and what its columns mean."""
    meta, cfg = report['metadata'], report['config']
    header, rows = table_rows(report)
    iters = ', '.join(f'{task} {n}' for task, n in cfg['iters'].items())
    lines = [
        f'# Accuracy benchmark: {", ".join(cfg["tasks"])} x {", ".join(cfg["variants"])}, '
        f'seeds {", ".join(map(str, cfg["seeds"]))}',
        '',
        f'- date: {meta["date"]}; git commit {meta["git_commit"]}'
        + ('' if meta.get('git_clean') else ' (with local changes)'),
        f'- device: {meta["device"]} ({meta["device_name"]}), {meta["cpu_count"]} CPUs; torch '
        f'{meta["versions"]["torch"]}, mmengine {meta["versions"]["mmengine"]}, '
        + ', '.join(f'{name} {meta["versions"][name]}' for name in ('mmdet', 'mmseg', 'mmpretrain')
                    if meta['versions'].get(name)),
        f'- training iterations: {iters}; configs: '
        + '; '.join(f'{task}: `{c}`' for task, c in cfg['configs'].items()),
        f'- command: `{meta["command"]}`',
        '',
        'Each task and variant trained once per seed with the same seeded schedule (mmengine `randomness`, '
        'deterministic; seeded data order), evaluated on the val set at the end of training. mean ± std: over '
        f'the seeds (sample standard deviation). Δ: difference of the means to {cfg["variants"][0]}. '
        'train time: the training loop without the evaluation. peak RSS: resident-memory high-water mark of the '
        'training process (a process of its own per run, Python and the frameworks included) up to the end of '
        'training; CUDA peak: torch.cuda.max_memory_allocated.',
        '',
    ] + markdown_table(header, rows)
    return '\n'.join(lines) + '\n'


def draw_chart(report: Dict[str, Any], path: str) -> bool:
    """Per task: the metric (mean ± std, each seed a dot) and the training time
    by variant.  False (nothing drawn) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    tasks, variants = list(report['summary']), report['config']['variants']
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9.0, 3.4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, key, title in ((row[0], 'metric', report['config']['metric_names'][task]),
                               (row[1], 'train_time_s', 'train time (s)')):
            entries = [report['summary'][task][v][key] for v in variants]
            means = [e['mean'] if e else 0.0 for e in entries]
            errs = [(e['std'] or 0.0) if e else 0.0 for e in entries]
            ax.bar(range(len(variants)), means, yerr=errs, capsize=4, color=[f'C{i}' for i in range(len(variants))],
                   alpha=0.8)
            for i, e in enumerate(entries):
                seeds = [v for v in (e or {}).get('per_seed', {}).values() if v is not None]
                ax.plot([i] * len(seeds), seeds, 'k.', markersize=5)
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(variants)
            ax.set_title(f'{task}: {title}', fontsize=10)
    meta = report['metadata']
    fig.suptitle(f'mean ± std over seeds {", ".join(map(str, report["config"]["seeds"]))} (dots: seeds); '
                 f'{meta["device_name"]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)
    return True
