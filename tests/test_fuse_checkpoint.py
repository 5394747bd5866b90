"""tools/fuse_checkpoint.py on toy-config checkpoints: outputs, --verify,
--backbone-only, --onnx, and one clear error (nothing written) per bad input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import orepa_mm
from conftest import DET_CFG, ROOT, SEG_CFG, load_tool
from orepa_mm.toy_data.jobs import TOY_JOBS

fuse_tool = load_tool('fuse_checkpoint')

DBB_CFG = ROOT / 'configs/toy/faster-rcnn_r18w16-dbb_fpn_300i_toy-coco.py'


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and branch scales, as after training."""
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        if name.endswith('running_var'):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith('running_mean') or name.endswith('branch_scales'):
            t.add_(torch.randn(t.shape, generator=g) * 0.1)


def _training_checkpoint(config: Path, path: Path) -> Path:
    """Write an mmengine-layout checkpoint of ``config``'s model (randomised
    statistics and branch scales) to ``path``."""
    cfg = fuse_tool.load_config(str(config))
    model = fuse_tool.build_model(cfg)
    _randomise(model)
    torch.save({'meta': {'iter': 10, 'dataset_meta': {'classes': ('person', 'bicycle', 'car')}},
                'state_dict': model.state_dict(), 'optimizer': {'state': {}, 'param_groups': []}}, path)
    return path


@pytest.fixture(scope='module')
def training_ckpt(tmp_path_factory) -> Path:
    """An mmengine-layout checkpoint of the toy OREPA detector."""
    return _training_checkpoint(DET_CFG, tmp_path_factory.mktemp('ckpt') / 'iter_10.pth')


def _files(d: Path) -> set:
    return {p.name for p in d.iterdir()} if d.exists() else set()


def _fail(capsys, args, match: str, out_dir: Path) -> None:
    before = _files(out_dir)
    assert fuse_tool.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.count('error:') == 1
    assert _files(out_dir) == before, 'nothing may be written on error'


def test_fuse_writes_deploy_config_and_checkpoint(training_ckpt, tmp_path, capsys):
    out = tmp_path / 'out'
    assert fuse_tool.main([str(DET_CFG), str(training_ckpt), str(out), '--verify']) == 0
    name = DET_CFG.stem
    assert _files(out) == {f'{name}_fused.pth', f'{name}_fused.py'}
    ckpt = torch.load(out / f'{name}_fused.pth', map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'} and ckpt['meta']['orepa_mm_fused']
    assert ckpt['meta']['fused_from']['checkpoint'] == str(training_ckpt)
    cfg = Config.fromfile(str(out / f'{name}_fused.py'))
    assert cfg.model.backbone.type == 'ResNet' and cfg.model.backbone.conv_cfg is None
    assert 'custom_imports' not in cfg and 'init_cfg' not in cfg.model.backbone
    from mmdet.registry import MODELS
    vanilla = MODELS.build(cfg.model)
    vanilla.load_state_dict(ckpt['state_dict'], strict=True)
    assert orepa_mm.count_reparam_layers(vanilla) == 0


def test_verify_reports_relative_difference(training_ckpt, tmp_path):
    summary = fuse_tool.fuse_checkpoint(str(DET_CFG), str(training_ckpt), str(tmp_path / 'o'), do_verify=True)
    assert 0 <= summary['max_rel_diff'] <= 1e-5
    assert summary['params_after'] < summary['params_before']
    assert summary['layers_fused'] == orepa_mm.count_reparam_layers(fuse_tool.build_model(
        fuse_tool.load_config(str(DET_CFG))))


def test_backbone_only_matches_vanilla_backbone_layout(training_ckpt, tmp_path):
    out = tmp_path / 'bb'
    assert fuse_tool.main([str(DET_CFG), str(training_ckpt), str(out), '--backbone-only']) == 0
    assert _files(out) == {f'{DET_CFG.stem}_fused_backbone.pth'}
    sd = torch.load(out / f'{DET_CFG.stem}_fused_backbone.pth', weights_only=True)['state_dict']
    from mmdet.models.backbones import ResNet
    plain = ResNet(depth=18, base_channels=16)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # Usable as Pretrained init of another model.
    other = ResNet(depth=18, base_channels=16, init_cfg=dict(type='Pretrained', checkpoint=str(
        out / f'{DET_CFG.stem}_fused_backbone.pth')))
    other.init_weights()
    assert torch.equal(other.conv1.weight, sd['conv1.weight'])


def test_onnx_export_matches_onnxruntime(training_ckpt, tmp_path):
    summary = fuse_tool.fuse_checkpoint(str(DET_CFG), str(training_ckpt), str(tmp_path / 'onnx'), onnx=True)
    assert set(summary['onnx_max_rel_diff']) == {'backbone', 'backbone_neck', 'backbone_neck_rpn_head'}
    assert max(summary['onnx_max_rel_diff'].values()) < 1e-4
    assert [line.split(' ')[0] for line in summary['onnx_left_out']] == ['roi_head', 'post-processing']


def test_error_checkpoint_of_another_config(training_ckpt, tmp_path, capsys):
    _fail(capsys, [DBB_CFG, training_ckpt, tmp_path / 'x'], 'does not match the config', tmp_path / 'x')


def test_error_already_fused(training_ckpt, tmp_path, capsys):
    out = tmp_path / 'first'
    assert fuse_tool.main([str(DET_CFG), str(training_ckpt), str(out)]) == 0
    fused = out / f'{DET_CFG.stem}_fused.pth'
    _fail(capsys, [DET_CFG, fused, tmp_path / 'second'], 'already fused', tmp_path / 'second')
    # Also without our meta flag: recognised by its vanilla layout.
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': torch.load(fused, weights_only=True)['state_dict']}, bare)
    _fail(capsys, [DET_CFG, bare, tmp_path / 'third'], 'already fused', tmp_path / 'third')


def test_error_corrupt_and_truncated(training_ckpt, tmp_path, capsys):
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(training_ckpt.read_bytes()[: os.path.getsize(training_ckpt) // 2])
    _fail(capsys, [DET_CFG, truncated, tmp_path / 'o'], 'corrupt or truncated', tmp_path / 'o')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all' * 10)
    _fail(capsys, [DET_CFG, garbage, tmp_path / 'o'], 'corrupt or truncated', tmp_path / 'o')


def test_error_missing_files(training_ckpt, tmp_path, capsys):
    _fail(capsys, [DET_CFG, tmp_path / 'nope.pth', tmp_path / 'o'], 'checkpoint not found', tmp_path / 'o')
    _fail(capsys, [tmp_path / 'nope.py', training_ckpt, tmp_path / 'o'], 'config not found', tmp_path / 'o')


def test_error_existing_outputs_need_force(training_ckpt, tmp_path, capsys):
    out = tmp_path / 'out'
    assert fuse_tool.main([str(DET_CFG), str(training_ckpt), str(out)]) == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _fail(capsys, [DET_CFG, training_ckpt, out], 'already exists; pass --force', out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert fuse_tool.main([str(DET_CFG), str(training_ckpt), str(out), '--force']) == 0


def test_error_plain_config(training_ckpt, tmp_path, capsys):
    plain = ROOT / 'configs/toy/faster-rcnn_r18w16-plain_fpn_300i_toy-coco.py'
    _fail(capsys, [plain, training_ckpt, tmp_path / 'o'], 'nothing to fuse', tmp_path / 'o')


def test_segmentor_deploy_config(tmp_path):
    cfg = fuse_tool.load_config(str(SEG_CFG))
    dcfg = fuse_tool.deploy_config(cfg)
    assert dcfg.model.backbone.type == 'ResNetV1c' and dcfg.model.backbone.conv_cfg is None
    assert dcfg.model.get('pretrained') is None and 'custom_imports' not in dcfg


ALL_DET_CFG = ROOT / TOY_JOBS['detector'].config('orepa').replace('-orepa_', '-orepa-all_')
ALL_SEG_CFG = ROOT / TOY_JOBS['segmentor'].config('orepa').replace('-orepa_', '-orepa-all_')


@pytest.mark.parametrize('config', [ALL_DET_CFG, ALL_SEG_CFG], ids=['detector', 'segmentor'])
def test_orepa_all_fuses_backbone_neck_and_heads(config: Path, tmp_path, capsys):
    """OREPA in backbone, neck and heads: every layer fused, a deploy config
    with no re-param conv config anywhere that the vanilla framework builds
    and loads strictly, and --onnx exporting up to the dense head's outputs
    while naming what it left out."""
    ckpt = _training_checkpoint(config, tmp_path / 'iter_10.pth')
    out = tmp_path / 'out'
    summary = fuse_tool.fuse_checkpoint(str(config), str(ckpt), str(out), do_verify=True, onnx=True)
    model = fuse_tool.build_model(fuse_tool.load_config(str(config)))
    outside = [n for n, m in model.named_modules() if isinstance(m, orepa_mm.ReparamConv2d)
               and not n.startswith('backbone.')]
    assert outside and summary['layers_fused'] == orepa_mm.count_reparam_layers(model)
    assert summary['max_rel_diff'] <= 1e-5 and summary['biased_convs'] == []
    text = (out / f'{config.stem}_fused.py').read_text()
    assert 'OREPA' not in text and 'orepa_mm' not in text
    dcfg = Config.fromfile(str(out / f'{config.stem}_fused.py'))
    assert fuse_tool.reparam_conv_cfgs(dcfg.model) == []
    vanilla = fuse_tool.build_model(dcfg)
    vanilla.load_state_dict(torch.load(out / f'{config.stem}_fused.pth', weights_only=True)['state_dict'],
                            strict=True)
    assert orepa_mm.count_reparam_layers(vanilla) == 0
    onnx, left_out = summary['onnx_max_rel_diff'], summary['onnx_left_out']
    head = 'backbone_neck_bbox_head' if config == ALL_DET_CFG else 'backbone_decode_head'
    assert set(onnx) == {'backbone', head} | ({'backbone_neck'} if 'neck' in head else set()), left_out
    assert max(onnx.values()) < 1e-4
    assert any(line.startswith('post-processing') for line in left_out)
    log = capsys.readouterr().out
    assert 'ONNX left out: post-processing' in log


def test_dbb_head_without_bn_keeps_bias_and_names_the_layers(tmp_path, capsys):
    """DBB convs in a GroupNorm head: no BatchNorm absorbs the fused bias, so
    those convs keep it and the tool names them (the deploy config needs
    ``bias=True`` there); the fused model still equals the unfused one."""
    config = tmp_path / 'fcos_dbb_head.py'
    base = ROOT / TOY_JOBS['detector'].config('dbb')
    # conv_bias='auto': convs followed by a norm have no bias in the vanilla head.
    config.write_text(f"_base_ = {str(base)!r}\n"
                      "model = dict(bbox_head=dict(conv_cfg=dict(type='DBB'), conv_bias='auto'))\n")
    ckpt = _training_checkpoint(config, tmp_path / 'iter_10.pth')
    summary = fuse_tool.fuse_checkpoint(str(config), str(ckpt), str(tmp_path / 'out'), do_verify=True)
    model = fuse_tool.build_model(fuse_tool.load_config(str(config)))
    head_dbb = sorted(n for n, m in model.named_modules()
                      if isinstance(m, orepa_mm.DBBConv2d) and n.startswith('bbox_head.'))
    assert head_dbb and summary['biased_convs'] == head_dbb
    assert summary['max_rel_diff'] <= 1e-5
    log = capsys.readouterr().out
    assert 'bias=True' in log and head_dbb[0] in log
    sd = torch.load(tmp_path / 'out' / f'{config.stem}_fused.pth', weights_only=True)['state_dict']
    assert all(f'{n}.bias' in sd for n in head_dbb)
