"""Training schemes that run a second copy of an OREPA model, through mmengine's Runner.

* mmdet with ``EMAHook`` (the RTMDet/YOLOX recipe), validation on the EMA weights;
* mmpretrain's MoCo v2 and BYOL, whose momentum encoders (mmengine's
  ``ExponentialMovingAverage`` for MoCo, ``CosineEMA`` for BYOL) run in train
  mode under ``no_grad`` and are written through ``.data``.

At every iteration a hook runs each model of the run (the trained one, the
averaged one) on a fixed input and compares it with a model built anew from
the config and loaded with that model's own ``state_dict``: the outputs must
be bitwise equal (both compute the same kernel from the same values, so any
difference is a stale kernel).  The mmengine/torch-only schemes (EMA probe,
mean teacher, frozen teacher, SWA) are in ``test_kernel_cache.py``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import EMAHook, Hook
from mmengine.runner import Runner

from conftest import DET_CFG

pytestmark = pytest.mark.slow
ITERS = 3


def _max_rel(got, want) -> float:
    """Largest relative difference between two (nested tuples of) tensors."""
    if isinstance(got, (tuple, list)):
        return max(_max_rel(a, b) for a, b in zip(got, want))
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


class FreshModelCheck(Hook):
    """After every training iteration (and around validation), each watched
    model's output on a fixed input against a fresh model from its state_dict."""

    priority = 'LOWEST'  # after the EMA/momentum updates of the iteration

    def __init__(self, watched: Callable[[Runner], Dict[str, nn.Module]], build: Callable[[str], nn.Module],
                 run: Callable[[nn.Module, torch.Tensor], object], size: int) -> None:
        self.watched, self.build, self.run_model, self.size = watched, build, run, size
        self.errors: Dict[str, List[float]] = {}

    def _check(self, runner: Runner, when: str) -> None:
        x = torch.randn(2, 3, self.size, self.size, generator=torch.Generator().manual_seed(0))
        for name, model in self.watched(runner).items():
            buffers = {k: v.clone() for k, v in model.named_buffers()}  # the check must not move BN statistics
            fresh = self.build(name)
            fresh.load_state_dict(model.state_dict())
            fresh.train(model.training)
            with torch.no_grad():
                got, want = self.run_model(model, x), self.run_model(fresh, x)
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
            self.errors.setdefault(f'{name} ({when})', []).append(_max_rel(got, want))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._check(runner, 'train')

    def before_val_epoch(self, runner) -> None:
        self._check(runner, 'val')


def _runner(cfg: Config, work: Path, check: FreshModelCheck) -> Runner:
    cfg.work_dir = str(work)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(check)
    return runner


def _assert_exact(check: FreshModelCheck, expected: List[str]) -> None:
    assert sorted(check.errors) == sorted(expected), check.errors
    for key, errors in check.errors.items():
        assert errors and all(e == 0.0 for e in errors), f'{key}: relative errors {errors}'


def test_ema_hook_detector(toy_root: Path, tmp_path: Path, monkeypatch) -> None:
    """The toy OREPA Faster R-CNN with ``EMAHook`` (ExpMomentumEMA), validated on the EMA weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    monkeypatch.chdir(toy_root)
    cfg = Config.fromfile(str(DET_CFG))
    cfg.train_cfg.max_iters, cfg.train_cfg.val_interval = ITERS, ITERS
    cfg.train_dataloader.batch_size = 2
    cfg.custom_hooks = [dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.2, update_buffers=True,
                             priority=49)]

    def watched(runner: Runner) -> Dict[str, nn.Module]:
        ema = next(h for h in runner.hooks if isinstance(h, EMAHook))
        return {'model': runner.model, 'ema': ema.ema_model.module}

    def build(_: str) -> nn.Module:
        return MODELS.build(copy.deepcopy(cfg.model))

    # Each model as validation runs it (eval mode); the features the heads see.
    def run(model: nn.Module, x: torch.Tensor):
        was = model.training
        model.eval()
        try:
            return model.extract_feat(x)
        finally:
            model.train(was)

    check = FreshModelCheck(watched, build, run, 96)
    runner = _runner(cfg, tmp_path / 'work', check)
    runner.train()
    _assert_exact(check, ['model (train)', 'ema (train)', 'model (val)', 'ema (val)'])


def _selfsup_cfg(base: str, model: dict) -> Config:
    """A tiny OREPA version of an mmpretrain self-supervised config on the toy ImageNet set."""
    view = [dict(type='RandomResizedCrop', scale=48, crop_ratio_range=(0.5, 1.), backend='pillow'),
            dict(type='RandomFlip', prob=0.5)]
    cfg = Config.fromfile(base)
    cfg.merge_from_dict(dict(
        custom_imports=dict(imports=['orepa_mm'], allow_failed_imports=False),
        model=model,
        train_dataloader=dict(
            batch_size=4, num_workers=0, persistent_workers=False, drop_last=True,
            sampler=dict(type='DefaultSampler', shuffle=True),
            dataset=dict(data_root='data/toy/imagenet', split='train', indices=4 * ITERS, pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='MultiView', num_views=2, transforms=[view]),
                dict(type='PackInputs')])),
        # The configs' own loop: by epoch, so ``model.train()`` (which also drops
        # OREPA's reused kernels) is called once, not at every iteration.
        train_cfg=dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=1),
        param_scheduler=[], randomness=dict(seed=0),
        env_cfg=dict(dist_cfg=dict(backend='gloo'))))
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
    return cfg


BACKBONE = dict(type='OREPAResNet', depth=18, stem_channels=16, base_channels=16, norm_cfg=dict(type='BN'),
                zero_init_residual=False)
SELF_SUP = {
    'mocov2': ('mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py', 'encoder_k', dict(
        type='MoCo', queue_len=16, feat_dim=16, momentum=0.2, backbone=BACKBONE,
        neck=dict(type='MoCoV2Neck', in_channels=128, hid_channels=32, out_channels=16, with_avg_pool=True),
        head=dict(type='ContrastiveHead', loss=dict(type='CrossEntropyLoss'), temperature=0.2))),
    'byol': ('byol/byol_resnet50_16xb256-coslr-200e_in1k.py', 'target_net', dict(
        type='BYOL', base_momentum=0.2, backbone=BACKBONE,
        neck=dict(type='NonLinearNeck', in_channels=128, hid_channels=32, out_channels=16, num_layers=2,
                  with_bias=True, with_last_bn=False, with_avg_pool=True),
        head=dict(type='LatentPredictHead', loss=dict(type='CosineSimilarityLoss'),
                  predictor=dict(type='NonLinearNeck', in_channels=16, hid_channels=32, out_channels=16,
                                 num_layers=2, with_bias=True, with_last_bn=False, with_avg_pool=False)))),
}


@pytest.mark.parametrize('method', SELF_SUP)
def test_momentum_encoder(method: str, toy_root: Path, tmp_path: Path, monkeypatch) -> None:
    """mmpretrain's momentum encoder (an EMA of backbone and neck) in train mode under no_grad."""
    import mmpretrain
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    monkeypatch.chdir(toy_root)
    base, encoder_attr, model = SELF_SUP[method]
    cfg = _selfsup_cfg(str(Path(mmpretrain.__file__).parent / '.mim' / 'configs' / base), model)

    def watched(runner: Runner) -> Dict[str, nn.Module]:
        m = runner.model
        return {'online': nn.Sequential(m.backbone, m.neck), 'momentum': getattr(m, encoder_attr).module}

    def build(_: str) -> nn.Module:
        return nn.Sequential(MODELS.build(copy.deepcopy(cfg.model.backbone)),
                             MODELS.build(copy.deepcopy(cfg.model.neck)))

    check = FreshModelCheck(watched, build, lambda m, x: m(x), 48)
    runner = _runner(cfg, tmp_path / 'work', check)
    runner.train()
    _assert_exact(check, ['online (train)', 'momentum (train)'])
