"""Every shipped model config loads, builds and runs one training iteration
(its own optimizer settings, synthetic toy-sized input), in each framework
(mmdet, mmseg, mmpretrain); every deploy config (``configs/deploy``) reads as
mmdeploy reads it."""
from __future__ import annotations

import copy
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

import orepa_mm
from conftest import ROOT
from orepa_mm.layers.orepa import ALL_BRANCHES

CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if not {'_base_', 'deploy'} & set(p.parts))
DEPLOY_CONFIGS = sorted((ROOT / 'configs' / 'deploy').glob('*.py'))
#: The framework of each task, as deploy configs are named ``{task}_{backend}_{shape}``.
DEPLOY_TASKS = {'detection': ('mmdet', 'ObjectDetection'), 'segmentation': ('mmseg', 'Segmentation'),
                'classification': ('mmpretrain', 'Classification')}


@pytest.mark.parametrize('path', DEPLOY_CONFIGS, ids=[p.name for p in DEPLOY_CONFIGS])
def test_deploy_config_reads_as_its_name_says(path: Path):
    mmdeploy_utils = pytest.importorskip('mmdeploy.utils')
    cfg = Config.fromfile(str(path))
    task, backend, shape = path.stem.split('_', 2)
    assert (cfg.codebase_config.type, cfg.codebase_config.task) == DEPLOY_TASKS[task]
    assert mmdeploy_utils.get_backend(cfg).value == backend.split('-')[0]
    dynamic = mmdeploy_utils.is_dynamic_shape(cfg) or mmdeploy_utils.is_dynamic_batch(cfg)  # classifiers: batch
    assert dynamic == shape.startswith('dynamic'), shape
    if backend.startswith('tensorrt'):
        common = cfg.backend_config.common_config
        assert common.fp16_mode and common.get('int8_mode', False) == backend.endswith('int8')
        assert cfg.backend_config.model_inputs[0].input_shapes.input.min_shape[1] == 3


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


def _cls_batch(h: int, w: int, num_classes: int) -> dict:
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(label) for label in (0, num_classes - 1)]
    return dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for _ in samples], data_samples=samples)


def _batch(scope: str, path: Path, model_cfg: dict) -> dict:
    if scope == 'mmseg':
        return _seg_batch(64, 128)
    if scope == 'mmpretrain':
        return _cls_batch(64, 64, model_cfg['head']['num_classes'])
    return _det_batch(64, 96, with_mask='mask' in path.name)


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
    _check_custom_keys(cfg, model)
    batch = _batch(scope, path, model_cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if 'backbone' in n and p.requires_grad}
    losses = model.train_step(batch, optim)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert changed > 0, 'the optimizer step must update the backbone'
    kind = 'OREPA' if '-orepa' in path.name or '_orepa' in path.name else 'DBB' if 'dbb' in path.name else None
    names = {type(m).__name__ for m in model.backbone.modules()}
    if kind == 'OREPA':
        assert 'OREPAConv2d' in names and 'DBBConv2d' not in names
    elif kind == 'DBB':  # the paper's baseline: the 3x3 convs only
        assert 'DBBConv2d' in names and 'OREPAConv2d' not in names
        for name, m in model.backbone.named_modules():
            if isinstance(m, (torch.nn.Conv2d, orepa_mm.ReparamConv2d)):
                assert (type(m).__name__ == 'DBBConv2d') == (m.kernel_size == (3, 3)), name
    else:
        assert not names & {'OREPAConv2d', 'DBBConv2d'}
    options = cfg.model.backbone.get('conv_cfg') or {}  # the ablations' branches and scaling
    for name, m in model.backbone.named_modules():
        if isinstance(m, orepa_mm.OREPAConv2d):
            assert m.branches.scaling == options.get('scaling', 'channel'), name
            assert set(m.branches.branch_names) <= set(options.get('branches') or ALL_BRANCHES), name
    outside = _reparam_parts(cfg.model)
    assert bool(outside) == ('-orepa-all' in path.name), outside
    for part in outside:  # a re-param conv_cfg in a neck or head builds re-param layers there
        module = model.get_submodule(part)
        assert any(isinstance(m, orepa_mm.OREPAConv2d) for m in module.modules()), part
    for part, module in model.named_children():
        if part != 'backbone' and not any(p == part or p.startswith(part + '.') for p in outside):
            assert orepa_mm.count_reparam_layers(module) == 0, part


def _check_custom_keys(cfg: Config, model: torch.nn.Module) -> None:
    """What the configs' ``custom_keys`` mean holds for every parameter,
    frozen ones included (as if unfrozen): no decay on any branch scale, and
    the smaller lr on everything in the linear deep stem, its branch scales
    too.  mmengine applies only the longest key that matches a name, so a
    stem key alone would take the stem's scales out of ``decay_mult=0``."""
    keys = cfg.optim_wrapper.get('paramwise_cfg', {}).get('custom_keys', {})
    stem = 'backbone.conv1.branches.stack'
    if 'branch_scales' not in keys and stem not in keys:
        return
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        optimizer = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper)).optimizer
    finally:
        for p in frozen:
            p.requires_grad_(False)
    groups = {id(p): g for g in optimizer.param_groups for p in g['params']}
    base_lr = cfg.optim_wrapper.optimizer.lr
    for name, p in model.named_parameters():
        group = groups[id(p)]
        if 'branch_scales' in keys and name.endswith('branch_scales'):
            assert group['weight_decay'] == 0, name
        if stem in keys and name.startswith(stem + '.'):
            assert group['lr'] == pytest.approx(keys[stem]['lr_mult'] * base_lr), name


def _reparam_parts(model_cfg: dict, prefix: str = '') -> list:
    """The dotted names of the model's parts other than the backbone (necks,
    heads, a RoI head's mask head...) whose config has a re-param ``conv_cfg``."""
    found = []
    for key, value in model_cfg.items():
        if not isinstance(value, dict) or (not prefix and key == 'backbone'):
            continue
        if str((value.get('conv_cfg') or {}).get('type', '')) in ('OREPA', 'DBB'):
            found.append(prefix + key)
        else:
            found += _reparam_parts(value, f'{prefix}{key}.')
    return found


def _backbone_init(cfg: Config) -> object:
    """What the backbone of ``cfg`` initialises from: its ``init_cfg``, or the
    model's ``pretrained`` (which mmseg's EncoderDecoder hands to the backbone)."""
    return cfg.model.backbone.get('init_cfg') or cfg.model.get('pretrained')


DBB_CONFIGS = [p for p in CONFIGS if '-dbb' in p.name]


@pytest.mark.parametrize('path', DBB_CONFIGS, ids=[p.name for p in DBB_CONFIGS])
def test_dbb_config_starts_from_the_plain_siblings_weights(path: Path, tmp_path: Path):
    """The DBB variant initialises from what its plain sibling initialises from
    (ImageNet for the COCO / Cityscapes configs), and a plain checkpoint given
    there makes its backbone compute exactly what the plain backbone computes."""
    cfg = Config.fromfile(str(path))
    plain_cfg = Config.fromfile(str(path).replace('-dbb', '-plain'))
    assert _backbone_init(cfg) == _backbone_init(plain_cfg)
    if 'toy' not in path.parts and cfg.default_scope != 'mmpretrain':  # ImageNet classifiers train from scratch
        assert _backbone_init(cfg), 'the full-size detection and segmentation configs start from ImageNet weights'
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    models = importlib.import_module(f'{scope}.registry').MODELS
    plain_bb = copy.deepcopy(plain_cfg.model.backbone)
    plain_bb.pop('init_cfg', None)
    torch.manual_seed(0)
    plain = models.build(plain_bb)
    with torch.no_grad():  # pretrained-like values: non-trivial weights and BN statistics
        for m in plain.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, std=(2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    checkpoint = tmp_path / 'plain.pth'
    torch.save({'state_dict': plain.state_dict()}, checkpoint)
    dbb_bb = copy.deepcopy(cfg.model.backbone)
    dbb_bb['init_cfg'] = dict(type='Pretrained', checkpoint=str(checkpoint))
    model = models.build(dbb_bb)
    model.init_weights()
    assert orepa_mm.count_reparam_layers(model) > 0
    if cfg.model.backbone.get('norm_cfg', {}).get('type') == 'SyncBN':
        assert all(isinstance(bn, torch.nn.SyncBatchNorm)
                   for m in model.modules() if isinstance(m, orepa_mm.DBBConv2d) for bn in m.norms())
    plain.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
