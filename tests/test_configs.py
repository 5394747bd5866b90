"""Every shipped config loads, builds and runs one training iteration
(its own optimizer settings, synthetic toy-sized input), in both frameworks."""
from __future__ import annotations

import copy
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from conftest import ROOT

CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)


def _bn_instead_of_syncbn(node) -> None:
    """In place: SyncBN needs a distributed run."""
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for v in node.values():
            _bn_instead_of_syncbn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _bn_instead_of_syncbn(v)


def _det_batch(h: int, w: int, with_mask: bool) -> dict:
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]])
    samples = []
    for _ in range(2):
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1., 1.)))
        gt = InstanceData(bboxes=boxes.clone(), labels=torch.tensor([0, 1]))
        if with_mask:
            masks = np.zeros((2, h, w), dtype=np.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            gt.masks = BitmapMasks(masks, h, w)
        s.gt_instances = gt
        samples.append(s)
    return dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for _ in samples], data_samples=samples)


def _seg_batch(h: int, w: int) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, h, w)))
        samples.append(s)
    return dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for _ in samples], data_samples=samples)


@pytest.mark.parametrize('path', CONFIGS, ids=[str(p.relative_to(ROOT / 'configs')) for p in CONFIGS])
def test_config_builds_and_trains_one_iteration(path: Path):
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports == dict(imports=['orepa_mm'], allow_failed_imports=False)
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    model_cfg = copy.deepcopy(cfg.model)
    _bn_instead_of_syncbn(model_cfg)
    model_cfg.pop('pretrained', None)
    model_cfg['backbone']['init_cfg'] = None  # no downloads here
    if scope == 'mmseg':
        model_cfg['data_preprocessor']['size'] = (64, 128)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(model_cfg)
    model.init_weights()
    model.train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    batch = _seg_batch(64, 128) if scope == 'mmseg' else _det_batch(64, 96, with_mask='mask' in path.name)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if 'backbone' in n and p.requires_grad}
    losses = model.train_step(batch, optim)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert changed > 0, 'the optimizer step must update the backbone'
    kind = 'OREPA' if '-orepa' in path.name or '_orepa' in path.name else 'DBB' if 'dbb' in path.name else None
    names = {type(m).__name__ for m in model.backbone.modules()}
    if kind == 'OREPA':
        assert 'OREPAConv2d' in names and 'DBBConv2d' not in names
    elif kind == 'DBB':
        assert 'DBBConv2d' in names and 'OREPAConv2d' not in names
    else:
        assert not names & {'OREPAConv2d', 'DBBConv2d'}
