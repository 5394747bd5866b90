"""Hooks for mmengine's Runner, registered into mmengine's root ``HOOKS``
(found from every scope: ``custom_hooks=[dict(type='BranchSimilarityHook')]``
in an mmdet or mmseg config)."""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Dict, List, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..branch_similarity import layer_similarities, mean_similarity
from ..checkpoint import atomic_write_text

__all__ = ['BranchSimilarityHook']


@HOOKS.register_module()
class BranchSimilarityHook(Hook):
    """Track how alike the OREPA branches stay during training.

    Every ``interval`` training iterations (and after the last) it computes
    the per-layer branch similarity (:mod:`orepa_mm.branch_similarity`),
    logs the mean over layers as ``branch_similarity`` with the training
    scalars, and at the end of training writes every measurement to
    ``<work_dir>/<out_file>`` (JSON: the iterations, the mean and each
    layer's mean cosine).

    Args:
        interval: iterations between measurements.
        out_file: file name in the Runner's work_dir.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 50, out_file: str = 'branch_similarity.json') -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'BranchSimilarityHook: interval must be a positive int, got {interval!r}')
        self.interval = interval
        self.out_file = out_file
        self.history: List[Dict[str, Any]] = []

    def _measure(self, runner) -> Optional[float]:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        records = layer_similarities(model)
        mean = mean_similarity(records)
        if mean is not None:
            self.history.append(dict(iter=runner.iter + 1, mean_cosine=mean,
                                     layers={r['layer']: r['mean_cosine'] for r in records}))
        return mean

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            mean = self._measure(runner)
            if mean is not None:
                runner.message_hub.update_scalar('train/branch_similarity', mean)

    def after_train(self, runner) -> None:
        if self.history:
            path = osp.join(runner.work_dir, self.out_file)
            atomic_write_text(path, json.dumps(dict(interval=self.interval, history=self.history), indent=1))
            runner.logger.info(f'branch similarity during training: {path}')
