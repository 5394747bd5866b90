"""The main job: train, evaluate and fuse OREPA models on built-in toy data.

    make demo          # = scripts/setup.sh, then: .venv/bin/python tools/demo.py

1. generates the toy COCO- and Cityscapes-format sets (``orepa_mm.toy_data``)
   under ``data/toy`` unless they are there;
2. trains the toy OREPA FCOS and the toy OREPA PSPNet (``orepa_mm.toy_data.jobs``,
   seeded by their configs' ``randomness``) with mmengine's Runner, progress on
   the console, evaluating with the real COCO bbox metric and Cityscapes mIoU;
3. fuses both with ``orepa_mm.fuse_model``, evaluates again and compares the
   predictions of the fused and the unfused model;
4. prints a summary.  Work goes to ``work_dirs/demo/``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp
import time
from typing import Dict, Optional, Sequence

import torch

import orepa_mm
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, build_runner, log, tool_main
from orepa_mm.config import load_config
from orepa_mm.deploy import max_relative_gap
from orepa_mm.toy_data.jobs import metric_value

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def prediction_gap(model_a: torch.nn.Module, model_b: torch.nn.Module, data_batch: dict) -> float:
    """Largest difference between two models' raw outputs on a batch,
    relative to each output's magnitude (fuse_checkpoint's --verify check)."""
    with torch.no_grad():
        data = model_a.data_preprocessor(data_batch, False)
    return max_relative_gap(model_a, model_b, [data])


def evaluate(runner, console_log: str) -> dict:
    """``runner.test()`` with its console output (the evaluators' own prints,
    e.g. the COCO tables) appended to ``console_log`` instead of the terminal."""
    with open(console_log, 'a') as stream, contextlib.redirect_stdout(stream):
        return runner.test()


def metric_of(metrics: dict, key: str, name: str) -> float:
    """``metrics[key]``, 0 with a log line where the evaluation returned nothing."""
    value, note = metric_value(metrics, key, name)
    if note:
        log(f'{name}: {note}')
    return value


def run_job(name: str, config: str, metric_key: str, work_root: str, max_iters: Optional[int]) -> Dict[str, float]:
    """Train ``config``, evaluate it, fuse it, evaluate the fused model."""
    cfg = load_config(osp.join(ROOT, config))
    cfg.work_dir = osp.join(work_root, name)
    if max_iters:
        cfg.train_cfg.max_iters = max_iters
    # Evaluated below, once unfused and once fused, rather than by the training loop.
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    runner = build_runner(cfg, quiet_setup=True)
    log(f'{name}: training {config} for {cfg.train_cfg.max_iters} iterations (log: {runner.log_dir})')
    start = time.time()
    runner.train()
    train_time = time.time() - start
    console_log = osp.join(runner.log_dir, 'evaluation_console.log')
    metrics = evaluate(runner, console_log)
    model = runner.model
    model.eval()
    fused = orepa_mm.fuse_model(model)
    batch = next(iter(runner.test_dataloader))
    gap = prediction_gap(model, fused, batch)
    n_layers = orepa_mm.count_reparam_layers(model)
    runner.model = fused
    fused_metrics = evaluate(runner, console_log)
    metric, fused_metric = metric_of(metrics, metric_key, name), metric_of(fused_metrics, metric_key, name)
    log(f'{name}: {metric_key} {metric:.3f}, fused {fused_metric:.3f} (trained in {train_time:.0f} s)')
    return dict(metric=metric, fused_metric=fused_metric, train_time=train_time,
                gap=gap, layers=n_layers, metric_key=metric_key)


@tool_main('demo')
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    parser.add_argument('--max-iters', type=int, default=None, help='override training iterations (smoke runs)')
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the configs' data_root is relative to the repository
    torch.manual_seed(0)
    from orepa_mm.toy_data import StaleToyDataError, ensure_toy_data
    try:
        ensure_toy_data(osp.join(ROOT, 'data', 'toy'))
    except StaleToyDataError as err:
        raise ToolError(str(err)) from err
    from orepa_mm.toy_data.jobs import TOY_JOBS
    results = {name: run_job(name, job.config('orepa'), job.metric, args.work_dir, args.max_iters)
               for name, job in TOY_JOBS.items() if job.in_demo}
    print('\n==== orepa_mm demo: OREPA models trained on the toy data, then fused ====')
    print(f'{"model":<10} {"metric":<14} {"unfused":>8} {"fused":>8} {"train s":>8} {"layers":>7} '
          f'{"max |fused-unfused| / |out|":>28}')
    for name, r in results.items():
        print(f'{name:<10} {r["metric_key"]:<14} {r["metric"]:>8.3f} {r["fused_metric"]:>8.3f} '
              f'{r["train_time"]:>8.1f} {r["layers"]:>7d} {r["gap"]:>28.2e}')
    worst = max(r['gap'] for r in results.values())
    if worst > 1e-5:
        raise SystemExit(f'fused predictions differ from unfused ones by {worst:.2e} (> 1e-5)')
    print('fused models reproduce the unfused predictions (relative difference <= 1e-5); OREPA layers carry no BN '
          'of their own, so a fused conv holds exactly the kernel the unfused layer generates')


if __name__ == '__main__':
    raise SystemExit(main())
