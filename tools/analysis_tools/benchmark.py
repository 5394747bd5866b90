"""Training and inference cost of plain, DBB and OREPA models, measured in one process.

    python tools/analysis_tools/benchmark.py --workloads resnet50 --variants plain dbb orepa \\
        --batch-size 2 --input-size 512 512 --rounds 5 --warmup 1 --out-dir benchmark_results

For every workload (``--workloads``, alias ``--models``; see
``benchmark_lib/workloads.py``) and every variant it measures:

* training step time: forward, backward, SGD-with-momentum step (median over
  rounds; the variants alternate inside each round, so that the drift of a
  shared, noisy machine hits them alike);
* activation memory: the bytes autograd keeps for backward, each storage
  once, parameters and buffers excluded: exact and independent of the
  device; on CUDA also the peak of ``torch.cuda.max_memory_allocated``
  during a step, above what was allocated before it;
* the convolution and matrix-product FLOPs of one training step, in total
  and by operator (the floor under the step-time ratio);
* the ATen operators one training step dispatches ("ops/step": forward,
  backward and the foreach SGD step, views and aliases excluded): exact and
  independent of the input size, the stable proxy for launch overhead
  (compare counts of one device type: see ``benchmark_lib/counters.py``);
* parameter, gradient and optimizer-state bytes;
* evaluation forward time (no_grad, eval mode) of the unfused model and of
  the model after :func:`orepa_mm.fuse_model`.

``--amp`` (with ``--amp-dtype float16|bfloat16``) trains under autocast, as
mmengine's ``AmpOptimWrapper`` does; ``--capture cuda`` replays the batched
kernel generation from CUDA graphs (:func:`orepa_mm.set_generation_capture`).

Each figure is also given as a ratio to the first variant (``plain`` by
default).  Results go to ``<out-dir>/benchmark_<workloads>_<batch>x<h>x<w>``
``.json`` (with metadata: versions, device, threads, command line, date),
``.md`` and ``.png`` (a bar chart of the ratios; skipped, with a note, when
matplotlib is missing); the table is printed.

``--sweep`` instead measures the training step at every batch size of
``--batch-sizes`` and input size of ``--input-sizes`` (square; default: the
``--input-size``), relates each variant to plain against the work per step,
fits a fixed-plus-proportional model of the extra time and reports where
OREPA's step falls to 1.10x plain's and below DBB's
(``benchmark_lib/sweep.py``); it writes ``sweep_<workload>_<size>.json``,
``.md`` and ``.png``.

``--profile VARIANT`` instead runs :mod:`torch.profiler` over a few training
steps of that variant of the first workload and prints (and saves) the top
operators by self CPU time.

Synthetic data: a seeded random batch per workload, shared by all variants;
detection samples carry 3 random gt boxes and labels, segmentation samples a
random label map.  The model's data preprocessor is bypassed (the inputs are
already "normalised").  Weights: random (no pretrained download), the parts
outside the backbone shared and the BatchNorm statistics calibrated (see
``benchmark_lib/measure.py``).  The learning rate is 0 by default: the
optimizer does all its work but the weights, and so that work, stay the
same in every round.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import os.path as osp
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
from mmengine.logging import print_log

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:  # run from a checkout without orepa_mm installed
    sys.path.insert(0, REPO)

from benchmark_lib import report as rep  # noqa: E402
from benchmark_lib import sweep  # noqa: E402
from benchmark_lib.measure import OPTIMIZER, RunSettings, measure_workload, profile_training  # noqa: E402
from benchmark_lib.workloads import DEFAULT_VARIANTS, VARIANTS, WORKLOADS, make_workload  # noqa: E402

from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, get_logger, log, tool_main  # noqa: E402
from orepa_mm.layers.generation_capture import CAPTURE_MODES, set_generation_capture  # noqa: E402

PROG = 'benchmark'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--workloads', '--models', dest='workloads', nargs='+', default=['resnet50'],
                        choices=WORKLOADS, help='workloads to measure')
    parser.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help="the first one is the baseline of the ratios. dbb: the paper's DBB baseline (DBB "
                        'layers for the k x k convs, 1x1 convs and the 7x7 stem plain); orepa: every conv an OREPA '
                        'layer')
    parser.add_argument('--batch-size', type=int, default=2, help='images per step')
    parser.add_argument('--input-size', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                        help='input height and width')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds; the median is reported')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per variant first')
    parser.add_argument('--iters', type=int, default=1, help='steps per timing (their mean is one sample)')
    parser.add_argument('--out-dir', default='benchmark_results', help='where the JSON, Markdown and PNG go')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None,
                        help='None: cuda when available, else cpu')
    parser.add_argument('--amp', action='store_true', help='torch.autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None,
                        help='the autocast dtype with --amp (float16 steps with a GradScaler)')
    parser.add_argument('--capture', choices=list(CAPTURE_MODES), default='off',
                        help='replay the batched kernel generation from recordings: cuda (CUDA graphs), '
                             'simulate (their fixed buffers, eagerly) or off (eager generation)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch.set_num_threads (None: torch's choice); 1 is far less sensitive to other "
                        'work on a shared CPU')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights and the synthetic data')
    parser.add_argument('--lr', type=float, default=0.0,
                        help='SGD learning rate (momentum 0.9). The default 0 does all the work of a step but keeps '
                        'the weights, so the data-dependent work of a detector (proposals, RoIs) stays that of '
                        'the calibrated initial weights in every round and variant, and nothing diverges')
    parser.add_argument('--skip-eval', action='store_true', help='skip the evaluation-forward timings')
    parser.add_argument('--sweep', action='store_true',
                        help='measure the training step over --batch-sizes x --input-sizes and fit the cost model')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 2, 4, 8, 16],
                        help='the sweep\'s batch sizes')
    parser.add_argument('--input-sizes', type=int, nargs='+', default=None,
                        help='the sweep\'s square input sizes (default: --input-size)')
    parser.add_argument('--profile', choices=VARIANTS, default=None,
                        help='instead of the benchmark, profile training steps of this variant of the first '
                        'workload')
    parser.add_argument('--profile-steps', type=int, default=3, help='profiled training steps')
    parser.add_argument('--profile-top', type=int, default=25, help='rows of the profile table')
    args = parser.parse_args(argv)
    if len(set(args.variants)) != len(args.variants) or len(set(args.workloads)) != len(args.workloads):
        parser.error('--workloads and --variants must not repeat')
    if min(args.rounds, args.iters, args.batch_size, args.profile_steps, *args.input_size) < 1 or args.warmup < 0:
        parser.error('--rounds, --iters, --batch-size, --input-size and --profile-steps must be >= 1, '
                     '--warmup >= 0')
    if {'orepa', 'orepa-kernel'} <= set(args.variants):
        parser.error('--variants orepa and orepa-kernel cannot be measured in one process: OREPA models in one '
                     'process share their kernel generations (layers of the same shape are generated together), '
                     'so each would pay for the other\'s kernels; measure them in two runs, each with plain')
    if args.amp_dtype and not args.amp:
        parser.error('--amp-dtype needs --amp')
    if args.sweep and (len(args.workloads) != 1 or 'plain' not in args.variants or args.profile):
        parser.error('--sweep measures one workload against plain (and cannot be combined with --profile)')
    if args.sweep and min(args.batch_sizes + (args.input_sizes or [1])) < 1:
        parser.error('--batch-sizes and --input-sizes must be >= 1')
    if 'pspnet' in args.workloads and args.batch_size < 2:
        parser.error('pspnet needs --batch-size >= 2: its pyramid pooling has a 1x1 bin followed by BN, '
                     'which cannot train on one value per channel')
    return args


def output_stem(args: argparse.Namespace, device: torch.device) -> str:
    """``<batch>x<h>x<w>``, with ``_cuda`` and ``_amp`` where they apply."""
    h, w = args.input_size
    stem = f'{args.batch_size}x{h}x{w}'
    if device.type == 'cuda':
        stem += '_cuda'
    if args.amp:
        stem += f'_amp-{args.amp_dtype}' if args.amp_dtype else '_amp'
    if args.capture != 'off':
        stem += f'_capture-{args.capture}'
    return stem


def run_profile(args: argparse.Namespace, settings: RunSettings, device: torch.device, stem: str) -> None:
    """Profile the first workload's ``--profile`` variant; print and save the table."""
    name, variant = args.workloads[0], args.profile
    workload = make_workload(name, args.batch_size, tuple(args.input_size), device, args.seed)
    table = profile_training(workload, variant, settings, args.profile_steps, args.profile_top)
    header = (f'# torch.profiler: {args.profile_steps} training steps of {name} ({variant}), batch '
              f'{args.batch_size}, input {args.input_size[0]}x{args.input_size[1]}, device {device}'
              f'{", AMP" if args.amp else ""}; top {args.profile_top} ops by self CPU time\n')
    os.makedirs(args.out_dir, exist_ok=True)
    path = osp.join(args.out_dir, f'profile_{name}_{variant}_{stem}.txt')
    with open(path, 'w') as f:
        f.write(header + table + '\n')
    print(header + table, flush=True)
    log(f'wrote {path}')


def run_benchmark(args: argparse.Namespace, settings: RunSettings, device: torch.device,
                  stem: str) -> Dict[str, Any]:
    """Measure every workload, write the reports, print the table; return the report."""
    start = time.perf_counter()
    report: Dict[str, Any] = dict(metadata=rep.metadata(device, args.amp, args.amp_dtype), config=dict(
        models=args.workloads, variants=args.variants, batch_size=args.batch_size, input_size=args.input_size,
        rounds=args.rounds, warmup=args.warmup, iters=args.iters, amp=args.amp, seed=args.seed, lr=args.lr,
        capture=args.capture, optimizer=OPTIMIZER), results={})
    for name in args.workloads:
        workload = make_workload(name, args.batch_size, tuple(args.input_size), device, args.seed)
        results = measure_workload(workload, settings)
        report['results'][name] = dict(baseline=args.variants[0], variants=results,
                                       ratios=rep.ratios(results, args.variants[0]))
    report['metadata']['wall_time_s'] = round(time.perf_counter() - start, 1)
    report['metadata']['load_average_end'] = rep.load_average()

    written = rep.write_report(report, osp.join(args.out_dir, f'benchmark_{"_".join(args.workloads)}_{stem}'))
    header, rows = rep.table_rows(report)
    print('\n' + rep.text_table(header, rows), flush=True)
    for line in rep.comparisons(report) + rep.workload_lines(report):
        print(line)
    if not written[-1].endswith('.png'):
        log('matplotlib is not installed: no chart drawn (pip install matplotlib)')
    log(f'wrote {", ".join(written)} in {report["metadata"]["wall_time_s"]:.0f} s')
    return report


def run_sweep(args: argparse.Namespace, settings: RunSettings, device: torch.device) -> Dict[str, Any]:
    """Measure the sweep's points (training steps only), fit the cost model, write and print the report."""
    name = args.workloads[0]
    sizes = [(s, s) for s in args.input_sizes] if args.input_sizes else [tuple(args.input_size)]
    start = time.perf_counter()
    report: Dict[str, Any] = dict(metadata=rep.metadata(device, args.amp, args.amp_dtype), config=dict(
        workload=name, variants=args.variants, batch_sizes=args.batch_sizes, input_sizes=sizes,
        rounds=args.rounds, warmup=args.warmup, iters=args.iters, amp=args.amp, seed=args.seed,
        capture=args.capture), points=[])
    sweep_settings = dataclasses.replace(settings, skip_eval=True)
    for size in sizes:
        for batch in args.batch_sizes:
            log(f'sweep: {name}, batch {batch}, {size[0]}x{size[1]}')
            workload = make_workload(name, batch, size, device, args.seed)
            report['points'].append(sweep.point(batch, size, measure_workload(workload, sweep_settings)))
    report['fit'] = sweep.fit(report['points'])
    report['metadata']['wall_time_s'] = round(time.perf_counter() - start, 1)
    stem = f'sweep_{name}_{"-".join(str(s[0]) for s in sizes)}' + ('_cuda' if device.type == 'cuda' else '') \
        + (f'_amp-{args.amp_dtype or "default"}' if args.amp else '')
    written = sweep.write(report, osp.join(args.out_dir, stem))
    sweep.print_table(report)
    log(f'wrote {", ".join(written)} in {report["metadata"]["wall_time_s"]:.0f} s')
    return report


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark (or the profile) that ``argv`` asks for."""
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ToolError('--device cuda: CUDA is not available')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.capture == 'cuda' and device.type != 'cuda':
        raise ToolError(f'--capture cuda records CUDA graphs: the device is {device} (use --capture simulate '
                        'to exercise the same code path on the CPU)')
    if args.threads:
        torch.set_num_threads(args.threads)

    load = rep.load_average()
    if device.type == 'cpu' and load and load[0] >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print_log(f'the machine is busy (load average {load[0]} on {os.cpu_count()} CPUs); CPU timings with '
                  f'{torch.get_num_threads()} threads suffer badly from contention: consider --threads 1',
                  logger=get_logger(), level=logging.WARNING)
    settings = RunSettings(variants=tuple(args.variants), rounds=args.rounds, warmup=args.warmup,
                           iters=args.iters, amp=args.amp, amp_dtype=args.amp_dtype, lr=args.lr, seed=args.seed,
                           skip_eval=args.skip_eval)
    set_generation_capture(args.capture)
    stem = output_stem(args, device)
    if args.profile:
        run_profile(args, settings, device, stem)
    elif args.sweep:
        run_sweep(args, settings, device)
    else:
        run_benchmark(args, settings, device, stem)


if __name__ == '__main__':
    raise SystemExit(main())
