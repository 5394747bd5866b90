"""The benchmark's report: ratios to the baseline, metadata, and the JSON,
Markdown, text-table and PNG-chart renderings."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .workloads import REPO

#: Metrics reported as ratios, in table order: (key, column title, kind).
METRICS = (
    ('train_step_s', 'train step', 'time'),
    ('train_gflop', 'train GFLOP', 'gflop'),
    ('train_ops', 'ops/step', 'ops'),
    ('saved_activation_bytes', 'saved for backward', 'bytes'),
    ('cuda_max_allocated_bytes', 'CUDA step peak', 'bytes'),
    ('param_grad_optimizer_bytes', 'params+grads+optim', 'bytes'),
    ('eval_unfused_s', 'eval (unfused)', 'time'),
    ('eval_fused_s', 'eval (fused)', 'time'),
)
#: Operators named per variant in the Markdown report.
TOP_OPS = 6


# ---------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------
def metric_value(result: Dict[str, Any], key: str) -> Optional[float]:
    """A metric's number: the median for timings, the value itself otherwise."""
    value = result.get(key)
    if isinstance(value, dict):
        value = value['median']
    return value


def ratios(results: Dict[str, Dict[str, Any]], baseline: str) -> Dict[str, Dict[str, Optional[float]]]:
    """Every metric of every variant divided by the baseline variant's."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    keys = [key for key, _, _ in METRICS] + ['params']
    for variant, result in results.items():
        out[variant] = {}
        for key in keys:
            value, base = metric_value(result, key), metric_value(results[baseline], key)
            out[variant][key] = None if value is None or not base else value / base
    return out


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the packages that matter here (None where missing)."""
    out: Dict[str, Optional[str]] = {}
    for module in ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'orepa_mm', 'numpy'):
        try:
            out[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is just not reported
            out[module] = None
    return out


def git_commit() -> Optional[str]:
    """The repository's HEAD commit, if git can tell."""
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was (timings on a shared one are noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def metadata(device: torch.device, amp: bool, amp_dtype: Optional[str] = None) -> Dict[str, Any]:
    """Date, command line, versions, device and machine load at the start."""
    meta: Dict[str, Any] = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        python=platform.python_version(), platform=platform.platform(), versions=package_versions(),
        git_commit=git_commit(), device=str(device), cpu=cpu_model(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), load_average_start=load_average(),
        amp=(None if not amp else amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')))
    if device.type == 'cuda':
        meta['device_name'] = torch.cuda.get_device_name(device)
        meta['cuda'] = torch.version.cuda
    else:
        meta['device_name'] = meta['cpu']
    return meta


# ---------------------------------------------------------------------------
# Tables and summary lines
# ---------------------------------------------------------------------------
def fmt_value(value: Optional[float], kind: str) -> str:
    """A metric's value in its unit ('-' when not measured)."""
    if value is None:
        return '-'
    if kind == 'time':
        return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.3f} s'
    if kind == 'bytes':
        return f'{value / 1e9:.2f} GB' if value >= 1e9 else f'{value / 1e6:.1f} MB'
    if kind == 'gflop':
        return f'{value:.1f}'
    if kind == 'ops':
        return f'{value:,}'
    return f'{value / 1e6:.2f}M'


def table_metrics(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """The metrics shown for this report (the CUDA peak only on CUDA)."""
    cuda = report['metadata']['device'].startswith('cuda')
    return [m for m in METRICS if cuda or m[0] != 'cuda_max_allocated_bytes']


def table_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the results table ("value (ratio x)" cells)."""
    metrics = table_metrics(report)
    header = ['model', 'variant', 'params'] + [title for _, title, _ in metrics]
    rows = []
    for name, res in report['results'].items():
        for variant, result in res['variants'].items():
            ratio = res['ratios'][variant]
            row = [name, variant, f'{fmt_value(result["params"], "count")} ({ratio["params"]:.2f}x)']
            for key, _, kind in metrics:
                value = metric_value(result, key)
                row.append('-' if value is None else f'{fmt_value(value, kind)} ({ratio[key]:.2f}x)')
            rows.append(row)
    return header, rows


def comparisons(report: Dict[str, Any]) -> List[str]:
    """The paper's two claims, where plain, OREPA and a DBB variant were
    measured: OREPA's extra activation memory over plain relative to DBB's,
    and its training speed-up over DBB."""
    lines = []
    for name, res in report['results'].items():
        v = res['variants']
        for dbb in ('dbb', ):
            if not all(k in v for k in ('plain', 'orepa', dbb)):
                continue
            act = {k: v[k]['saved_activation_bytes'] for k in ('plain', 'orepa', dbb)}
            step = {k: v[k]['train_step_s']['median'] for k in ('plain', 'orepa', dbb)}
            parts = []
            if act['orepa'] <= act['plain']:
                parts.append(f'OREPA keeps no more for backward than plain ({act["orepa"] / act["plain"]:.2f}x), '
                             f'{dbb} {act[dbb] / act["plain"]:.2f}x')
            elif act[dbb] > act['plain']:
                share = (act['orepa'] - act['plain']) / (act[dbb] - act['plain'])
                parts.append(f'OREPA needs {share:.0%} of {dbb}\'s extra activation memory over plain '
                             f'({1 - share:.0%} less)')
            parts.append(f'OREPA trains {step[dbb] / step["orepa"]:.2f}x as fast as {dbb}')
            lines.append(f'{name}: ' + '; '.join(parts))
    return lines


def workload_lines(report: Dict[str, Any]) -> List[str]:
    """The data-dependent work per variant (e.g. a detector's RoIs), where recorded."""
    lines = []
    for name, res in report['results'].items():
        parts = []
        for variant, result in res['variants'].items():
            phases = {phase: stats for phase, stats in result.get('workload', {}).items() if stats}
            if phases:
                parts.append(f'{variant}: ' + ', '.join(f'{phase} ' + ' '.join(f'{k}={v}' for k, v in stats.items())
                                                        for phase, stats in phases.items()))
        if parts:
            lines.append(f'{name} data-dependent work: ' + '; '.join(parts))
    return lines


def _by_op_lines(report: Dict[str, Any], what: str, describe: Callable[[str, Dict[str, Any]], Optional[str]]
                 ) -> List[str]:
    """One line per workload: ``<name> <what>: `` and each variant's ``describe(variant, result)``."""
    lines = []
    for name, res in report['results'].items():
        parts = [part for variant, result in res['variants'].items() if (part := describe(variant, result))]
        if parts:
            lines.append(f'{name} {what}: ' + '; '.join(parts))
    return lines


def flop_lines(report: Dict[str, Any]) -> List[str]:
    """GEMM and convolution FLOPs of one training step by operator: the
    floor under the step-time ratio (OREPA's extra FLOPs are its kernel
    generation, the 1x1 blocks' regeneration in backward included)."""
    def describe(variant: str, result: Dict[str, Any]) -> Optional[str]:
        by_op = result.get('train_gflop_by_op')
        if not by_op:
            return None
        ops = ', '.join(f'{op} {gflop:.1f}' for op, gflop in sorted(by_op.items(), key=lambda kv: -kv[1]))
        return f'{variant} {result["train_gflop"]:.1f} ({ops})'
    return _by_op_lines(report, 'GFLOP per training step', describe)


def op_lines(report: Dict[str, Any]) -> List[str]:
    """Operators dispatched per training step and the most frequent ones:
    the host-side work that no FLOP count shows."""
    def describe(variant: str, result: Dict[str, Any]) -> Optional[str]:
        by_op = result.get('train_ops_by_op')
        if not by_op:
            return None
        common = ', '.join(f'{op} {n}' for op, n in list(by_op.items())[:TOP_OPS])
        return f'{variant} {result["train_ops"]:,} ({common}, ...)'
    return _by_op_lines(report, 'ATen operators per training step (views excluded)', describe)


def text_table(header: List[str], rows: List[List[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: List[str]) -> str:
        return '  '.join(str(c).ljust(w) for c, w in zip(cells, widths))

    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: List[str], rows: List[List[str]]) -> List[str]:
    """The lines of a Markdown table."""
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: settings, the table, the derived comparisons."""
    meta, cfg = report['metadata'], report['config']
    header, rows = table_rows(report)
    h, w = cfg['input_size']
    base = cfg['variants'][0]
    lines = [
        f'# Benchmark: {", ".join(cfg["models"])}, batch {cfg["batch_size"]}, input {h}x{w}',
        '',
        f'- date: {meta["date"]}',
        f'- device: {meta["device"]} ({meta["device_name"]}), {meta["torch_threads"]} torch thread(s), '
        f'{meta["cpu_count"]} CPUs',
        f'- load average (1/5/15 min): {meta["load_average_start"]} at the start, {meta["load_average_end"]} '
        'at the end',
        f'- torch {meta["versions"]["torch"]}, AMP: {meta["amp"] or "off"}',
        f'- {cfg["rounds"]} round(s) (median), {cfg["warmup"]} warm-up, {cfg["iters"]} step(s) per timing, '
        f'variants alternating in one process; {cfg["optimizer"]}, lr {cfg["lr"]}',
        f'- command: `{meta["command"]}`',
        '',
        f'Each cell: value (ratio to {base}). "saved for backward": bytes autograd keeps for backward, each '
        'storage once, parameters and buffers excluded. "params+grads+optim": parameters, their gradients and '
        'the SGD momentum buffers. "train GFLOP": convolution and matrix-product FLOPs of one training step '
        '(torch.utils.flop_counter). "ops/step": ATen operators dispatched by one training step (forward, '
        'backward, optimizer; views and aliases excluded), exact and independent of the input size. '
        'Times: median seconds per training step / evaluation forward.',
        '',
    ] + markdown_table(header, rows)
    extra = comparisons(report) + flop_lines(report) + op_lines(report) + workload_lines(report)
    if extra:
        lines += [''] + [f'- {line}' for line in extra]
    return '\n'.join(lines) + '\n'


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_chart(report: Dict[str, Any], path: str) -> bool:
    """Bar chart of the ratios, one panel per workload; False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    metrics = table_metrics(report)
    names = list(report['results'])
    variants = report['config']['variants']
    width_in = max(8.0, 2.0 + 0.45 * len(metrics) * len(variants))
    fig, axes = plt.subplots(len(names), 1, figsize=(width_in, 4.2 * len(names)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, name in zip(axes[:, 0], names):
        res = report['results'][name]
        for i, variant in enumerate(variants):
            values = [res['ratios'][variant][key] or 0.0 for key, _, _ in metrics]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=variant)
            for bar, value in zip(bars, values):
                ax.annotate(f'{value:.2f}', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha='center', va='bottom', fontsize=7)
        ax.axhline(1.0, color='gray', linestyle='--', linewidth=0.8)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([title for _, title, _ in metrics], fontsize=8)
        ax.set_ylabel(f'ratio to {res["baseline"]}')
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    cfg, meta = report['config'], report['metadata']
    fig.suptitle(f'batch {cfg["batch_size"]}, input {cfg["input_size"][0]}x{cfg["input_size"][1]}, '
                 f'{meta["device_name"]}{", AMP" if cfg["amp"] else ""}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: Dict[str, Any], base: str,
                 render: Optional[Callable[[Dict[str, Any]], str]] = None,
                 draw: Optional[Callable[[Dict[str, Any], str], bool]] = None) -> List[str]:
    """Write ``base`` + ``.json``, ``.md`` (``render``, default :func:`markdown`) and, with
    matplotlib, ``.png`` (``draw``, default :func:`draw_chart`); return the paths written."""
    os.makedirs(os.path.dirname(base) or '.', exist_ok=True)
    with open(base + '.json', 'w') as f:
        json.dump(report, f, indent=2)
    with open(base + '.md', 'w') as f:
        f.write((render or markdown)(report))
    written = [base + '.json', base + '.md']
    if (draw or draw_chart)(report, base + '.png'):
        written.append(base + '.png')
    return written
