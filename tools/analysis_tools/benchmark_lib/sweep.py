"""The cost sweep: how each variant's training step grows with the work per step.

For every batch size and input size of the sweep the workload is measured as
a single benchmark measures it (variants alternating in one process); the
sweep then relates each variant's step to plain's against the work per step
(images x pixels), beside its FLOP floor (its FLOPs over plain's), and fits

    t_plain(w) = p0 + p1 * w
    t_v(w) - t_plain(w) = a_v + c_v * w        (the variant's extra time)

by least squares: ``a`` is the fixed part (OREPA: the kernel generation,
which does not depend on the batch), ``c`` the part proportional to the work
(DBB: its branches run on the feature map).  From the fits: the work (and
batch size, at the sweep's first input size) where OREPA's step falls to
1.10x plain's, and where it stops costing more than DBB's.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .report import markdown_table, metric_value, pyplot, text_table, write_report

#: The step-time ratio the sweep reports the crossing of.
TARGET_RATIO = 1.10
#: Per point, the figures kept (``metric_value`` of the benchmark's results).
POINT_METRICS = ('train_step_s', 'train_gflop', 'train_ops', 'saved_activation_bytes', 'cuda_max_allocated_bytes',
                 'feature_path_layers')


def point(batch: int, size: Tuple[int, int], results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One measured point: its batch, size, work and each variant's figures."""
    return dict(batch=batch, input_size=list(size), work=batch * size[0] * size[1],
                variants={v: {k: metric_value(r, k) for k in POINT_METRICS} for v, r in results.items()})


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """``(intercept, slope)`` of the least-squares line through the points."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError('a fit needs at least two different amounts of work')
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit(points: List[Dict[str, Any]], baseline: str = 'plain') -> Dict[str, Any]:
    """The fitted cost model (module docstring) and the crossings it implies."""
    work = [p['work'] for p in points]
    p0, p1 = linear_fit(work, [p['variants'][baseline]['train_step_s'] for p in points])
    model: Dict[str, Any] = {baseline: dict(fixed_s=p0, per_work_s=p1)}
    for variant in points[0]['variants']:
        if variant == baseline:
            continue
        extra = [p['variants'][variant]['train_step_s'] - p['variants'][baseline]['train_step_s'] for p in points]
        a, c = linear_fit(work, extra)
        model[variant] = dict(extra_fixed_s=a, extra_per_work_s=c,
                              fixed_share_at_smallest=a / (a + c * min(work)) if a + c * min(work) else None)
    pixels = points[0]['input_size'][0] * points[0]['input_size'][1]
    crossings: Dict[str, Any] = dict(pixels_per_image=pixels)
    if 'orepa' in model:
        a, c = model['orepa']['extra_fixed_s'], model['orepa']['extra_per_work_s']
        # a + c w = (r - 1)(p0 + p1 w)  ->  w = (a - (r - 1) p0) / ((r - 1) p1 - c)
        r = TARGET_RATIO - 1
        w = _solve(a - r * p0, r * p1 - c)
        crossings['orepa_at_1.10x_plain'] = _as_batch(w, pixels)
        if 'dbb' in model:
            d0, d1 = model['dbb']['extra_fixed_s'], model['dbb']['extra_per_work_s']
            crossings['orepa_at_most_dbb'] = _as_batch(_solve(a - d0, d1 - c), pixels)
    return dict(model=model, crossings=crossings)


def _solve(numerator: float, denominator: float) -> Optional[float]:
    """``w >= numerator / denominator`` for a positive denominator; None: never."""
    if denominator <= 0:
        return None if numerator > 0 else 0.0
    return max(numerator / denominator, 0.0)


def _as_batch(work: Optional[float], pixels: int) -> Dict[str, Optional[float]]:
    if work is None:
        return dict(work=None, batch=None)
    return dict(work=work, batch=math.ceil(work / pixels) if work > 0 else 1)


def rows(points: List[Dict[str, Any]], baseline: str = 'plain') -> Tuple[List[str], List[List[str]]]:
    """The sweep table: per point, plain's step and each variant's ratios."""
    variants = [v for v in points[0]['variants'] if v != baseline]
    header = ['batch', 'input', 'work (Mpx)', f'{baseline} step']
    with_plans = [v for v in variants if points[0]['variants'][v].get('feature_path_layers') is not None]
    for v in variants:
        header += [f'{v} time', f'{v} FLOPs', f'{v} saved', f'{v} ops']
        if v in with_plans:
            header.append(f'{v} layers on features')
    table = []
    for p in points:
        base = p['variants'][baseline]
        row = [str(p['batch']), 'x'.join(map(str, p['input_size'])), f'{p["work"] / 1e6:.2f}',
               f'{base["train_step_s"] * 1e3:.1f} ms']
        for v in variants:
            mine = p['variants'][v]
            row += [_ratio(mine, base, k) for k in ('train_step_s', 'train_gflop', 'saved_activation_bytes',
                                                      'train_ops')]
            if v in with_plans:
                row.append(str(mine.get('feature_path_layers', '-')))
        table.append(row)
    return header, table


def _ratio(mine: Dict[str, Any], base: Dict[str, Any], key: str) -> str:
    if mine.get(key) is None or not base.get(key):
        return '-'
    return f'{mine[key] / base[key]:.2f}x'


def summary_lines(fitted: Dict[str, Any]) -> List[str]:
    """The fitted model and the crossings, in words."""
    model, cross = fitted['model'], fitted['crossings']
    lines = [f'plain step: {model["plain"]["fixed_s"] * 1e3:.1f} ms + '
             f'{model["plain"]["per_work_s"] * 1e9:.2f} ms per Mpx']
    for v, m in model.items():
        if v != 'plain':
            lines.append(f'{v} extra time: {m["extra_fixed_s"] * 1e3:.1f} ms fixed + '
                         f'{m["extra_per_work_s"] * 1e9:.2f} ms per Mpx')
    pixels = cross['pixels_per_image']
    for key, words in (('orepa_at_1.10x_plain', f'OREPA costs <= {TARGET_RATIO:.2f}x plain'),
                       ('orepa_at_most_dbb', 'OREPA costs no more than DBB')):
        if key in cross:
            c = cross[key]
            lines.append(f'{words}: ' + ('never, by the fit' if c['work'] is None else
                                         f'from {c["work"] / 1e6:.2f} Mpx per step, batch {c["batch"]} at '
                                         f'{pixels} px per image'))
    return lines


def markdown(report: Dict[str, Any]) -> str:
    header, table = rows(report['points'])
    cfg = report['config']
    text = [f'# Cost sweep: {cfg["workload"]}, {report["metadata"]["device_name"]}'
            f'{", AMP" if cfg["amp"] else ""}', '',
            f'Command: `{report["metadata"].get("command", "")}`', '',
            'Ratios to plain at each point (time: median step; FLOPs: the floor under the time ratio; '
            'saved: bytes kept for backward; ops: ATen operators dispatched per step).', '']
    text += markdown_table(header, table)
    text += ['', '## Fitted cost model', ''] + [f'- {line}' for line in summary_lines(report['fit'])]
    return '\n'.join(text) + '\n'


def draw(report: Dict[str, Any], path: str) -> bool:
    """The step-time ratios against the work per step, each variant's FLOP floor dashed."""
    plt = pyplot()
    if plt is None:
        return False
    points = report['points']
    work = [p['work'] / 1e6 for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, color in (('orepa', 'tab:red'), ('dbb', 'tab:blue')):
        if variant not in points[0]['variants']:
            continue
        time = [p['variants'][variant]['train_step_s'] / p['variants']['plain']['train_step_s'] for p in points]
        floor = [p['variants'][variant]['train_gflop'] / p['variants']['plain']['train_gflop'] for p in points]
        ax.plot(work, time, 'o-', color=color, label=f'{variant.upper()} step time / plain')
        ax.plot(work, floor, '--', color=color, alpha=0.6, label=f'{variant.upper()} FLOPs / plain (floor)')
    ax.axhline(TARGET_RATIO, color='grey', lw=0.8, ls=':', label=f'{TARGET_RATIO:.2f}x plain')
    ax.axhline(1.0, color='black', lw=0.8)
    ax.set_xscale('log')
    ax.minorticks_off()  # the measured points label the axis: work (and batch)
    ax.set_xticks(work)
    ax.set_xticklabels([f'{w:.2g}\n(batch {p["batch"]})' if len(report['config']['input_sizes']) == 1 else f'{w:.2g}'
                        for w, p in zip(work, points)], fontsize=8)
    ax.set_xlabel('work per step (images x pixels, millions)')
    ax.set_ylabel('ratio to plain')
    ax.set_title(f'{report["config"]["workload"]} training step, {report["metadata"]["device_name"]}', fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(report: Dict[str, Any], base: str) -> List[str]:
    """``base`` + ``.json``, ``.md`` and (with matplotlib) ``.png``; the paths written."""
    return write_report(report, base, markdown, draw)


def print_table(report: Dict[str, Any]) -> None:
    header, table = rows(report['points'])
    print('\n' + text_table(header, table), flush=True)
    for line in summary_lines(report['fit']):
        print(line)
