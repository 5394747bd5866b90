"""Classification end to end with the real mmpretrain on the toy ImageNet-format
set: ``mim train`` / ``mim test`` of the toy OREPA classifier, its fused
deploy checkpoint tested by vanilla mmpretrain in a process where orepa_mm
cannot be imported, and its backbone starting the toy detector and segmentor
(the paper's protocol: downstream models fine-tune OREPA ImageNet weights)."""
from __future__ import annotations

import copy
import importlib
import pickle
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import orepa_mm  # noqa: F401 - registers the layers and backbones
from conftest import CLS_CFG, ROOT, bin_path, last_metric, run
from orepa_mm import compat

pytestmark = pytest.mark.slow

DET_IN1K_CFG = ROOT / 'configs/toy/fcos_r18w32-orepa-toyin1k_fpn_600i_toy-coco.py'
SEG_IN1K_CFG = ROOT / 'configs/toy/pspnet_r18w32-d8-orepa-toyin1k_1xb4-300i_toy-cityscapes-128x256.py'
TOY_IN = 'data/toy/imagenet'  # relative to toy_root
TOP1 = 'accuracy/top1'


def test_mim_train_and_test_classifier(cls_run):
    assert 'OREPAResNet' in cls_run['train']
    top1 = last_metric(cls_run['test'], TOP1)
    assert 0.0 <= top1 <= 100.0
    assert abs(top1 - last_metric(cls_run['train'], TOP1)) < 1e-3  # mim test evaluates what training did


def test_fused_classifier_reproduces_top1_without_orepa_mm(cls_run, toy_root, no_orepa_env):
    out_dir = toy_root / 'fused_cls'
    fuse = run([sys.executable, str(ROOT / 'tools/fuse_checkpoint.py'), str(CLS_CFG), str(cls_run['ckpt']),
                str(out_dir), '--verify', '--onnx'], cwd=toy_root)
    log = fuse.stdout + fuse.stderr
    assert 'ONNX backbone_neck_head' in log, log[-2000:]  # the whole classifier up to its logits
    fused_cfg, fused_ckpt = out_dir / f'{CLS_CFG.stem}_fused.py', out_dir / f'{CLS_CFG.stem}_fused.pth'
    text = fused_cfg.read_text()
    assert 'orepa_mm' not in text and 'OREPA' not in text
    test = run([bin_path('mim'), 'test', 'mmpretrain', str(fused_cfg), '--checkpoint', str(fused_ckpt),
                '--work-dir', str(toy_root / 'test_fused_cls')], cwd=toy_root, env=no_orepa_env)
    assert abs(last_metric(test.stdout + test.stderr, TOP1) - last_metric(cls_run['test'], TOP1)) < 1e-3


def _build(path: Path, checkpoint: Path) -> torch.nn.Module:
    cfg = Config.fromfile(str(path))
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    model_cfg = copy.deepcopy(cfg.model)
    assert model_cfg.backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.in1k_checkpoint, prefix='backbone.')
    model_cfg.backbone.init_cfg.checkpoint = str(checkpoint)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(model_cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('cfg', [DET_IN1K_CFG, SEG_IN1K_CFG], ids=['detector', 'segmentor'])
def test_classifier_backbone_starts_the_toy_detector_and_segmentor(cfg: Path, cls_run):
    """The in1k configs' ``init_cfg`` loads every backbone key of the trained classifier (none missing,
    none left over), unchanged; the backbone then computes the classifier's features (the detector's
    at every stage; the dilated segmentor's where its strides and dilations are the classifier's)."""
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

    classifier_state = compat.load_weights_only(str(cls_run['ckpt']), map_location='cpu')['state_dict']
    expected = {k[len('backbone.'):]: v for k, v in classifier_state.items() if k.startswith('backbone.')}
    backbone = _build(cfg, cls_run['ckpt']).backbone
    got = backbone.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    cls_cfg = Config.fromfile(str(CLS_CFG))
    reference = MMPRETRAIN_MODELS.build(dict(cls_cfg.model.backbone, out_indices=(0, 1, 2, 3), init_cfg=None))
    reference.load_state_dict(expected, strict=True)
    reference.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = backbone(x), reference(x)
    same_geometry = 4 if cfg is DET_IN1K_CFG else 2  # the segmentor dilates stages 3 and 4
    for stage in range(same_geometry):
        assert torch.equal(ours[stage], theirs[stage]), f'stage {stage + 1}'


def test_converted_reference_classifier_evaluates_with_mim_test(toy_root: Path, tmp_path: Path):
    """The authors' layout (a random-weight ResNet-18 on the reference key list), converted with
    ``--classifier``, is evaluated by ``mim test mmpretrain`` with the shipped ImageNet config; the fused
    conversion, evaluated with the plain config, gives the same top-1 and the same scores (the same
    function, up to float32 rounding)."""
    from test_convert_reference import synth_reference

    src = tmp_path / 'orepa_res18.pth.tar'
    sd = synth_reference('official_orepa_resnet18_train_keys.tsv', seed=3)
    torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, src)
    converter = ROOT / 'tools/model_converters/convert_reference_checkpoint.py'
    top1, scores = {}, {}
    for variant, flags in (('orepa', []), ('plain', ['--fused'])):
        ckpt = tmp_path / f'{variant}.pth'
        run([sys.executable, str(converter), str(src), str(ckpt), '--classifier'] + flags, cwd=toy_root)
        cfg = ROOT / f'configs/mmpretrain/resnet18-{variant}_4xb64-coslr-120e_in1k.py'
        test = run([bin_path('mim'), 'test', 'mmpretrain', str(cfg), '--checkpoint', str(ckpt), '--work-dir',
                    str(tmp_path / f'test_{variant}'), '--out', str(tmp_path / f'{variant}.pkl'),
                    '--cfg-options', f'test_dataloader.dataset.data_root={TOY_IN}',
                    'test_dataloader.dataset.indices=8', 'test_dataloader.batch_size=8',
                    'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False'], cwd=toy_root)
        top1[variant] = last_metric(test.stdout + test.stderr, TOP1)
        with open(tmp_path / f'{variant}.pkl', 'rb') as f:
            scores[variant] = torch.stack([torch.as_tensor(r['pred_score']) for r in pickle.load(f)])
    assert top1['orepa'] == top1['plain']
    assert scores['orepa'].shape == (8, 1000)
    assert (scores['orepa'] - scores['plain']).abs().max() <= 1e-4 * scores['orepa'].abs().max()
