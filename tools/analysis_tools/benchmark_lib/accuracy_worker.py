"""One training run of the accuracy benchmark, in a process of its own.

    python accuracy_worker.py --config RUN_DIR/config.py --result RUN_DIR/result.json --metric KEY --spec JSON

``tools/analysis_tools/accuracy_benchmark.py`` starts it once per (task,
variant, seed), so that the peak memory it reports belongs to that run alone.
It trains with mmengine's Runner (the config already carries the seed, the
deterministic flag and the iterations), evaluates once at the end of
training, and writes the result JSON atomically: the metrics, the training
time (evaluation excluded), the loss of every iteration, and the memory
peaks.  Its console output is the Runner's log; the benchmark sends it to a
file.  Deliberately free of relative imports: it runs as a script.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch
from mmengine.hooks import Hook

from orepa_mm.checkpoint import atomic_write_text
from orepa_mm.config import load_config
from orepa_mm.toy_data.jobs import metric_value


def proc_status_bytes(field: str) -> Optional[int]:
    """``VmHWM`` / ``VmRSS`` of this process from ``/proc/self/status`` in bytes (None off Linux).

    The high-water mark belongs to this process's own address space; unlike
    ``ru_maxrss`` it does not inherit the peak of the parent that started it.
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RecordHook(Hook):
    """Records training time without evaluation, the loss of every iteration,
    the memory at the end of training and the last evaluation's metrics."""

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.train_time = 0.0
        self.losses: List[float] = []
        self.metrics: Dict[str, Any] = {}
        self.rss_before_train: Optional[int] = None
        self.peak_rss_train: Optional[int] = None
        self.cuda_peak_train: Optional[int] = None
        self._since: Optional[float] = None

    def _pause(self) -> None:
        if self._since is not None:
            self.train_time += time.perf_counter() - self._since
            self._since = None
        if self.peak_rss_train is None:  # the first evaluation is the one at the end of training
            self.peak_rss_train = proc_status_bytes('VmHWM')
            if torch.cuda.is_available():
                self.cuda_peak_train = torch.cuda.max_memory_allocated()

    def before_train(self, runner) -> None:
        self.rss_before_train = proc_status_bytes('VmRSS')
        self._since = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if outputs and 'loss' in outputs:
            self.losses.append(float(torch.as_tensor(outputs['loss']).detach()))

    def before_val_epoch(self, runner) -> None:
        self._pause()

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        self.metrics = dict(metrics or {})
        self._since = time.perf_counter()

    def after_train(self, runner) -> None:
        self._pause()


def train(config: str, metric: str) -> Dict[str, Any]:
    """Train and evaluate the config; return the measurements."""
    from mmengine.runner import Runner

    cfg = load_config(config)
    runner = Runner.from_cfg(cfg)
    # mmengine's deterministic mode makes ops without a deterministic kernel
    # (on CUDA: adaptive pooling, bilinear upsampling backward) raise; warn instead.
    torch.use_deterministic_algorithms(True, warn_only=True)
    record = RecordHook()
    runner.register_hook(record)
    runner.train()
    value, note = metric_value(record.metrics, metric, config)
    numbers = {k: float(v) for k, v in record.metrics.items() if isinstance(v, (int, float))}
    return dict(metric=value, metric_note=note, metrics=numbers,
                train_time_s=record.train_time, iters=len(record.losses), final_loss=record.losses[-1],
                losses=record.losses, rss_before_train_bytes=record.rss_before_train,
                peak_rss_bytes=record.peak_rss_train, peak_rss_process_bytes=proc_status_bytes('VmHWM'),
                cuda_max_allocated_bytes=record.cuda_peak_train,
                device='cuda' if torch.cuda.is_available() else 'cpu', torch_threads=torch.get_num_threads(),
                log_dir=runner.log_dir)


def main() -> None:
    """Run what the command line asks for and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', required=True, help='the run config (dumped by the benchmark)')
    parser.add_argument('--result', required=True, help='where the result JSON goes')
    parser.add_argument('--metric', required=True, help='the metric key of the evaluation')
    parser.add_argument('--spec', default='{}', help='JSON copied into the result (what the run is)')
    args = parser.parse_args()
    start = time.perf_counter()
    result = dict(json.loads(args.spec), **train(args.config, args.metric))
    result['wall_s'] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    atomic_write_text(args.result, json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
    main()
