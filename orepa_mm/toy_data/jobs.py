"""The toy training jobs that the demo and the accuracy benchmark run.

One entry per task: the toy config of each variant (paths relative to the
repository root, where the configs' ``data_root`` points) and the metric that
the task is judged by.  The demo trains the ``orepa`` variant of each task it
includes (the detector and the segmentor: with the classifier too it would
pass its time budget); ``tools/analysis_tools/accuracy_benchmark.py`` trains
every variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ['ToyJob', 'TOY_JOBS', 'TOY_VARIANTS', 'ABLATION_VARIANTS', 'metric_value']

#: The conv variants each toy task ships a config for.
TOY_VARIANTS: Tuple[str, ...] = ('plain', 'dbb', 'orepa')
#: The OREPA ablations (``OREPAConv2d``'s ``scaling`` and ``branches``), each a
#: config of its own: the scaling layers (``orepa`` has one scale per branch and
#: channel), then the components added in turn from the linearized DBB
#: branches (``-l2i``: the re-parameterized 1x1; ``orepa`` adds the linear
#: deep stem, which only the detector's 7x7 stem has).
ABLATION_VARIANTS: Tuple[str, ...] = ('orepa-scalar', 'orepa-noscale', 'orepa-base', 'orepa-base-prior',
                                      'orepa-base-prior-dws', 'orepa-base-prior-dws-l2i')


@dataclass(frozen=True)
class ToyJob:
    """A toy task: its config pattern (``{variant}`` is filled in), its metric,
    the ablation variants it has configs for and whether the demo trains it."""
    config_pattern: str
    metric: str
    metric_name: str
    ablations: Tuple[str, ...] = ()
    in_demo: bool = True

    @property
    def variants(self) -> Tuple[str, ...]:
        return TOY_VARIANTS + self.ablations

    def config(self, variant: str) -> str:
        """The config path of ``variant`` (one of :attr:`variants`)."""
        if variant not in self.variants:
            raise ValueError(f'unknown variant {variant!r}; expected one of {", ".join(self.variants)}')
        return self.config_pattern.format(variant=variant)


TOY_JOBS: Dict[str, ToyJob] = {
    'detector': ToyJob('configs/toy/fcos_r18w32-{variant}_fpn_600i_toy-coco.py', 'coco/bbox_mAP', 'bbox mAP',
                       ABLATION_VARIANTS),
    'segmentor': ToyJob('configs/toy/pspnet_r18w32-d8-{variant}_1xb4-300i_toy-cityscapes-128x256.py', 'mIoU',
                        'mIoU', ABLATION_VARIANTS[:-1]),  # no 7x7 stem: '-l2i' would be 'orepa'
    'classifier': ToyJob('configs/toy/resnet18w32-{variant}_1xb32-600i_toy-imagenet.py', 'accuracy/top1', 'top-1',
                         in_demo=False),
}


def metric_value(metrics: Mapping[str, Any], key: str, source: str) -> Tuple[float, Optional[str]]:
    """``metrics[key]`` as a float, and a note where it had to be made up.

    An evaluation that returned no metrics at all is counted as 0: mmdet's
    CocoMetric returns nothing when the model predicted no box (after very
    few iterations).  Metrics without ``key`` are an error naming ``source``.
    """
    if not metrics:
        return 0.0, 'the evaluation returned no metrics (no predictions): counted as 0'
    if key not in metrics:
        raise KeyError(f'{source}: the evaluation gave no {key!r} (got {sorted(metrics)})')
    return float(metrics[key]), None
