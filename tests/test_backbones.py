"""OREPA/DBB ResNets in mmdet and mmseg: registration, building with every
ResNet option, a training step, fusing into the vanilla class, function-
preserving ImageNet-style pretrained loading, and optional frameworks."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope

import orepa_mm
from conftest import run
from orepa_mm.layers import DBBConv2d
from orepa_mm.layers.orepa import OREPAKxKBranches


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = sum(o.float().pow(2).mean() for o in model(x))
    loss.backward()
    opt.step()


def _mmdet():
    from mmdet.registry import MODELS
    return MODELS


def _mmseg():
    from mmseg.registry import MODELS
    return MODELS


CASES = {
    'mmdet-ResNet50': (_mmdet, dict(type='ResNet', depth=50, norm_eval=False)),
    'mmseg-ResNetV1c50-d8': (_mmseg, dict(type='ResNetV1c', depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                                          contract_dilation=True)),
}


@pytest.mark.parametrize('kind', ['OREPA', 'DBB'])
@pytest.mark.parametrize('case', list(CASES))
def test_train_step_then_fuse_into_vanilla_class(case, kind):
    registry, cfg = CASES[case]
    models = registry()
    torch.manual_seed(0)
    model = models.build(dict(cfg, conv_cfg=dict(type=kind)))
    model.init_weights()
    x = torch.randn(2, 3, 64, 64)
    _train_step(model, x)
    _randomise_bn(model)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        fused = orepa_mm.fuse_model(model)
        vanilla = models.build(dict(cfg, conv_cfg=None))
        vanilla.load_state_dict(fused.state_dict(), strict=True)
        vanilla.eval()
        got = vanilla(x)
    assert orepa_mm.count_reparam_layers(fused) == 0
    assert {k: v.shape for k, v in fused.state_dict().items()} == \
        {k: v.shape for k, v in vanilla.state_dict().items()}
    for a, b in zip(ref, got):
        assert _rel(a, b) <= 1e-5
    assert orepa_mm.fuse_model(fused) is not fused  # idempotent, returns a copy
    assert orepa_mm.count_reparam_layers(orepa_mm.fuse_model(fused)) == 0


def test_init_weights_keeps_designed_scales():
    model = _mmdet().build(dict(type='ResNet', depth=50, conv_cfg=dict(type='OREPA')))
    model.init_weights()
    scales = torch.tensor([OREPAKxKBranches.INIT_SCALES[b] for b in OREPAKxKBranches.BRANCHES])
    kxk = [m for m in model.modules() if isinstance(m, OREPAKxKBranches)]
    assert kxk
    for m in kxk:
        assert torch.equal(m.branch_scales[:, 0], scales)
        assert torch.count_nonzero(m.weight_1x1_kxk_first) == 0  # identity-initialised branch intact


@pytest.mark.parametrize('framework,type_,plain_type', [
    ('mmdet', 'OREPAResNet', 'ResNet'),
    ('mmseg', 'OREPAResNetV1c', 'ResNetV1c'),
    ('mmdet', 'DBBResNet', 'ResNet'),
    ('mmseg', 'DBBResNetV1c', 'ResNetV1c'),
])
def test_pretrained_imagenet_checkpoint_loads_function_preserving(framework, type_, plain_type, tmp_path):
    """An ordinary (plain) ResNet checkpoint, as torchvision:// or open-mmlab://
    would provide, makes the OREPA / DBB backbone start as exactly that ResNet."""
    models = _mmdet() if framework == 'mmdet' else _mmseg()
    torch.manual_seed(1)
    plain = models.build(dict(type=plain_type, depth=50, norm_eval=False))
    _randomise_bn(plain, seed=3)
    for m in plain.modules():  # non-trivial conv weights, not the default init
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    path = tmp_path / 'resnet50_plain.pth'
    torch.save({'state_dict': plain.state_dict()}, path)
    model = models.build(dict(type=type_, depth=50, norm_eval=False,
                              init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    model.init_weights()
    assert orepa_mm.count_reparam_layers(model) > 0
    plain.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('type_', ['OREPA', 'orepa_mm.OREPA', 'DBB', 'orepa_mm.DBB'])
def test_conv_cfg_registration_under_each_scope(scope, type_):
    from mmcv.cnn import ConvModule, build_conv_layer
    with DefaultScope.overwrite_default_scope(scope):
        conv = build_conv_layer(dict(type=type_), 8, 16, 3, stride=2, padding=1, bias=False)
        assert isinstance(conv, orepa_mm.ReparamConv2d)
        block = ConvModule(8, 16, 3, padding=2, dilation=2, conv_cfg=dict(type=type_),
                           norm_cfg=dict(type='BN'))
    block.init_weights()  # must not run Kaiming over the branch design
    assert block.conv.kernel_size == (3, 3) and block.conv.dilation == (2, 2) and block.conv.bias is None
    block.eval()
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        assert _rel(block(x), orepa_mm.fuse_model(block)(x)) <= 1e-5


def test_backbone_accepts_resnet_options():
    mmdet_models, mmseg_models = _mmdet(), _mmseg()
    x = torch.randn(1, 3, 64, 64)
    variants = [
        (mmdet_models, dict(type='OREPAResNet', depth=18, frozen_stages=1, norm_eval=True, with_cp=True,
                            out_indices=(1, 3), strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))),
        (mmdet_models, dict(type='OREPAResNetV1d', depth=34, plugins=None, zero_init_residual=False)),
        (mmdet_models, dict(type='OREPAResNetV1c', depth=18, avg_down=True)),
        (mmdet_models, dict(type='DBBResNet', depth=101, num_stages=2, strides=(1, 2), dilations=(1, 1),
                            out_indices=(0, 1))),
        (mmseg_models, dict(type='OREPAResNetV1c', depth=18, multi_grid=(1, 2, 4), dilations=(1, 1, 2, 4),
                            strides=(1, 2, 1, 1), contract_dilation=True)),
        (mmseg_models, dict(type='OREPAResNet', depth=18, deep_stem=True, avg_down=True, frozen_stages=2)),
    ]
    for models, cfg in variants:
        model = models.build(cfg)
        model.init_weights()
        model.train()
        outs = model(x)
        assert len(outs) == len(cfg.get('out_indices', (0, 1, 2, 3))[:cfg.get('num_stages', 4)])
        frozen = cfg.get('frozen_stages', -1)
        if frozen >= 1:
            assert not any(p.requires_grad for p in model.layer1.parameters())
    v1c = mmdet_models.build(dict(type='OREPAResNetV1c', depth=18))
    assert v1c.deep_stem and type(v1c).vanilla_config(dict(type='OREPAResNetV1c', depth=18)) == \
        dict(type='ResNet', depth=18, deep_stem=True, conv_cfg=None)


def test_backbone_rejects_plain_conv_cfg():
    with pytest.raises(ValueError, match='re-parameterizable conv_cfg'):
        _mmdet().build(dict(type='OREPAResNet', depth=18, conv_cfg=dict(type='Conv2d')))


@pytest.mark.parametrize('missing,present', [('mmseg', 'mmdet'), ('mmdet', 'mmseg')])
def test_import_with_only_one_framework(missing, present, tmp_path):
    (tmp_path / 'sitecustomize.py').write_text(
        'import importlib.abc, sys\n'
        'class _Block(importlib.abc.MetaPathFinder):\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        f'        if name == {missing!r} or name.startswith({missing + "."!r}):\n'
        '            raise ModuleNotFoundError("blocked")\n'
        'sys.meta_path.insert(0, _Block())\n'
        'import importlib.util\n'
        '_orig = importlib.util.find_spec\n'
        f'importlib.util.find_spec = lambda n, *a: None if n == {missing!r} else _orig(n, *a)\n')
    code = (f'import orepa_mm, sys\nassert {missing!r} not in sys.modules\n'
            f'from {present}.registry import MODELS\n'
            "m = MODELS.build(dict(type='OREPAResNet', depth=18))\n"
            "print(type(m).__mro__[2].__module__)\n")
    out = run([sys.executable, '-c', code], cwd=tmp_path, env={'PYTHONPATH': str(tmp_path)})
    assert out.stdout.strip().startswith(present)


# -- DBB: the paper's baseline -------------------------------------------------------------
def _convs(model: nn.Module) -> dict:
    """name -> conv (plain or re-param) of every conv layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, orepa_mm.ReparamConv2d))}


@pytest.mark.parametrize('framework,type_,plain_type', [('mmdet', 'DBBResNet', 'ResNet'),
                                                        ('mmseg', 'DBBResNetV1c', 'ResNetV1c')])
def test_dbb_resnet_converts_only_the_3x3_convs(framework, type_, plain_type):
    models = _mmdet() if framework == 'mmdet' else _mmseg()
    plain = _convs(models.build(dict(type=plain_type, depth=50)))
    model = models.build(dict(type=type_, depth=50))
    convs = _convs(model)
    assert convs.keys() == plain.keys()
    for name, conv in convs.items():
        want = DBBConv2d if plain[name].kernel_size == (3, 3) else nn.Conv2d
        assert type(conv) is want, name
    if framework == 'mmdet':  # the paper's DBB ResNet-50: 40.68M parameters with the 1000-class classifier
        params = sum(p.numel() for p in model.parameters()) + 2048 * 1000 + 1000
        assert abs(params / 1e6 - 40.68) < 0.02, params
    # every conv, as a named option
    every = _convs(models.build(dict(type=type_, depth=50, conv_cfg=dict(type='DBB', every_conv=True))))
    assert all(type(conv) is DBBConv2d for conv in every.values())


@pytest.mark.parametrize('every_conv', [False, True])
def test_dbb_resnet_loads_a_plain_resnet_state_dict_strictly(every_conv):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    plain = ResNet(depth=18)
    _randomise_bn(plain, seed=5)
    model = _mmdet().build(dict(type='DBBResNet', depth=18, conv_cfg=dict(type='DBB', every_conv=every_conv)))
    _randomise_bn(model, seed=6)  # nothing of the DBB layers' own values may survive into the output
    model.load_state_dict(plain.state_dict(), strict=True)
    plain.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            assert _rel(a, b) <= 1e-5
    assert orepa_mm.count_reparam_layers(model) == (20 if every_conv else 16)  # + stem and 3 shortcuts
    assert {k: v.shape for k, v in orepa_mm.fuse_model(model).state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}


def _dbb_norms(module: nn.Module) -> list:
    return [bn for m in module.modules() if isinstance(m, DBBConv2d) for bn in m.norms()]


@pytest.mark.parametrize('framework,type_,stem', [('mmdet', 'DBBResNet', 'conv1'), ('mmseg', 'DBBResNetV1c', 'stem')])
def test_frozen_stages_freeze_the_bns_inside_dbb_layers(framework, type_, stem):
    models = _mmdet() if framework == 'mmdet' else _mmseg()
    model = models.build(dict(type=type_, depth=18, frozen_stages=1, norm_eval=False,
                              conv_cfg=dict(type='DBB', every_conv=True)))
    model.train()
    frozen = _dbb_norms(getattr(model, stem)) + _dbb_norms(model.layer1)
    trained = _dbb_norms(model.layer2)
    assert frozen and trained
    before = [bn.running_mean.clone() for bn in frozen + trained]
    model(torch.randn(2, 3, 64, 64))
    after = [bn.running_mean for bn in frozen + trained]
    assert all(not bn.training for bn in frozen) and all(bn.training for bn in trained)
    assert all(torch.equal(a, b) for a, b in zip(before[:len(frozen)], after[:len(frozen)])), 'frozen stats moved'
    assert all(not torch.equal(a, b) for a, b in zip(before[len(frozen):], after[len(frozen):]))


def test_norm_eval_freezes_every_bn_inside_dbb_layers_too():
    """``norm_eval=True``: every BN of the backbone stays in eval mode, the DBB
    layers' inner ones included, so training starts from the pretrained
    function (see ReparamResNetMixin); ``norm_eval=False`` trains them."""
    for norm_eval in (True, False):
        model = _mmdet().build(dict(type='DBBResNet', depth=18, norm_eval=norm_eval))
        model.train()
        norms = _dbb_norms(model)
        assert len(norms) == 16 * 6
        assert all(bn.training != norm_eval for bn in norms)


def test_dbb_inner_bns_follow_the_backbone_norm_cfg():
    for models, type_ in ((_mmdet(), 'DBBResNet'), (_mmseg(), 'DBBResNetV1c')):
        model = models.build(dict(type=type_, depth=18, norm_cfg=dict(type='SyncBN', requires_grad=True)))
        norms = _dbb_norms(model)
        assert norms and all(isinstance(bn, nn.SyncBatchNorm) for bn in norms)
        with pytest.raises(ValueError, match='cannot be folded'):
            models.build(dict(type=type_, depth=18, norm_cfg=dict(type='GN', num_groups=8)))
    # a conv_cfg's own norm_cfg wins
    model = _mmdet().build(dict(type='DBBResNet', depth=18, norm_cfg=dict(type='SyncBN'),
                                conv_cfg=dict(type='DBB', norm_cfg=dict(type='BN'))))
    assert all(type(bn) is nn.BatchNorm2d for bn in _dbb_norms(model))
