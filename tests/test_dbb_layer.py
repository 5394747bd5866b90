"""DBBConv2d as published: the branch structure (inner BNs, BN-and-pad, the
``groups >= out_channels`` variants) against an independent per-branch
implementation written here from the published description; exact fusing
with random statistics in every BN; the block is not linear in training;
plain checkpoints load function-preservingly; norm types; the ``'DBB'`` conv
type converts only k x k convs.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor

import orepa_mm  # noqa: F401  (registers the conv types)
from numerics import (  # noqa: F401  (_one_thread, _seed: autouse fixtures)
    TOL,
    _one_thread,
    _seed,
    assert_rel_close,
    block_identity,
    rel_err,
    settle_bn_,
)
from orepa_mm.fuse import fuse_model
from orepa_mm.layers import DBBConv2d, dbb_conv

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


def randomize_dbb_(layer: DBBConv2d) -> DBBConv2d:
    """Every branch contributes: the zero-initialised identity-based conv gets
    random values, and the layer's own bias too."""
    with torch.no_grad():
        layer.weight_1x1_kxk_first.add_(torch.randn_like(layer.weight_1x1_kxk_first) * 0.5)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def settled(layer: DBBConv2d, size: Tuple[int, int] = (9, 8)) -> DBBConv2d:
    """``layer`` with random running statistics and affine values in EVERY BN
    (inner ones included), in eval mode."""
    return settle_bn_(nn.Sequential(randomize_dbb_(layer)), layer.in_channels, size)[0]


# -- 1. the published structure ------------------------------------------------------
def bn(x: Tensor, norm: nn.BatchNorm2d) -> Tensor:
    """``norm`` applied with F.batch_norm (batch statistics in training, without updating anything)."""
    return F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias,
                        norm.training, 0.0, norm.eps)


def bn_and_pad(x: Tensor, norm: nn.BatchNorm2d, p: int) -> Tensor:
    """The published BN-and-pad: BN, then a border of ``p`` pixels holding
    ``bias - running_mean * weight / sqrt(running_var + eps)``, a constant
    for autograd (the published layer detaches it)."""
    y = bn(x, norm)
    weight, bias = norm.weight.detach(), norm.bias.detach()
    value = (bias - norm.running_mean * weight / torch.sqrt(norm.running_var + norm.eps)).view(1, -1, 1, 1)
    out = value.expand(y.shape[0], -1, y.shape[2] + 2 * p, y.shape[3] + 2 * p).clone()
    out[:, :, p:p + y.shape[2], p:p + y.shape[3]] = y
    return out


def published_dbb(x: Tensor, layer: DBBConv2d) -> Tensor:
    """The Diverse Branch Block as published, run branch by branch with
    ``nn.AvgPool2d``-style pooling (stride s, 'same' padding p = k // 2,
    dilation 1), reading the layer's weights and BNs."""
    k, s, g, out = layer.kernel_size[0], layer.stride[0], layer.groups, layer.out_channels
    p = k // 2
    cin = x.shape[1]
    y = bn(F.conv2d(x, layer.weight_origin, None, s, p, 1, g), layer.bn_origin)
    if g < out:
        y = y + bn(F.conv2d(x, layer.weight_1x1, None, s, 0, 1, g), layer.bn_1x1)
        avg = bn_and_pad(F.conv2d(x, layer.weight_avg, None, 1, 0, 1, g), layer.bn_avg_pad, p)
        y = y + bn(F.avg_pool2d(avg, k, s, 0), layer.bn_avg)
        first = layer.weight_1x1_kxk_first + block_identity(cin, g, x.dtype)[:, :, None, None]
    else:
        y = y + bn(F.avg_pool2d(x, k, s, p, count_include_pad=True), layer.bn_avg)
        first = layer.weight_1x1_kxk_first  # width 2 * in: a plain 1x1 conv
    mid = bn_and_pad(F.conv2d(x, first, None, 1, 0, 1, g), layer.bn_1x1_kxk_pad, p)
    y = y + bn(F.conv2d(mid, layer.weight_1x1_kxk_second, None, s, 0, 1, g), layer.bn_1x1_kxk)
    return y if layer.bias is None else y + layer.bias.view(1, -1, 1, 1)


#: (in, out, groups): dense, grouped, depthwise (groups == out == in)
STRUCTURE_CASES = ((4, 6, 1), (4, 6, 2), (6, 6, 6))


@pytest.mark.parametrize('channels', STRUCTURE_CASES, ids=str)
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('k', (3, 5))
def test_branches_are_the_published_structure(k: int, stride: int, channels: Tuple[int, int, int]) -> None:
    cin, cout, g = channels
    layer = settled(DBBConv2d(cin, cout, k, stride, k // 2, groups=g).double())
    names = {n for n, _ in layer.named_children()}
    if g < cout:
        assert names == {'bn_origin', 'bn_1x1', 'bn_avg_pad', 'bn_avg', 'bn_1x1_kxk_pad', 'bn_1x1_kxk'}
        assert layer.weight_1x1_kxk_first.shape[0] == cin and layer.identity_based
    else:  # depthwise: no 1x1 branch, the avg branch pools the input, 1x1-kxk twice as wide
        assert names == {'bn_origin', 'bn_avg', 'bn_1x1_kxk_pad', 'bn_1x1_kxk'}
        assert layer.weight_1x1_kxk_first.shape[0] == 2 * cin and not layer.identity_based
    x = torch.randn(3, cin, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(layer.eval()(x), published_dbb(x, layer), TOL[torch.float64], 'eval')
    layer.train()
    out = layer(x)
    ref = published_dbb(x, layer)
    assert_rel_close(out, ref, TOL[torch.float64], 'train')
    # and the gradients of every parameter and BN affine
    params = [p for _, p in layer.named_parameters()]
    grad_out = torch.randn_like(out)
    for (name, _), g1, g2 in zip(layer.named_parameters(), torch.autograd.grad(out, params, grad_out),
                                 torch.autograd.grad(ref, params, grad_out)):
        assert_rel_close(g1, g2, 1e-10, f'grad of {name}')


def test_k1_block_is_origin_and_1x1_kxk() -> None:
    layer = DBBConv2d(4, 6, 1)
    assert {n for n, _ in layer.named_children()} == {'bn_origin', 'bn_1x1_kxk_pad', 'bn_1x1_kxk'}


def test_inner_bns_make_training_non_linear() -> None:
    """In training the inner BNs normalise with batch statistics: the output
    of a sample depends on the rest of the batch, and differs from the block
    with only the branch-final BNs in training mode."""
    layer = settled(DBBConv2d(4, 6, 3, 1, 1).double())
    inner = [layer.bn_avg_pad, layer.bn_1x1_kxk_pad]
    x = torch.randn(4, 4, 9, 8, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        full = layer(x)
        for m in inner:
            m.eval()
        outer_only = layer(x)
        assert rel_err(full, outer_only) > 1e-2, 'the inner BNs do not act in training'
        for m in inner:
            m.train()
        # a sample's output depends on its batch: not a (per-sample) linear map
        assert rel_err(full[:1], layer(x[:1].expand(4, -1, -1, -1).contiguous() * 1.0)[:1]) > 1e-2
        # and the inner BNs' affine values are used
        layer.bn_1x1_kxk_pad.weight.mul_(2)
        assert rel_err(full, layer(x)) > 1e-3


# -- 2. fusing exactly -----------------------------------------------------------------
def fuse_cases() -> Iterator[Tuple[dict, Tuple[int, int]]]:
    """Stride 2, dilation 2, padding 0 / k // 2 / larger / asymmetric, groups
    (dense, grouped, groups >= out with in == out and in != out), bias."""
    channels = ((4, 8, 1), (4, 8, 2), (6, 6, 6), (8, 4, 4))
    for k, (s, d), (cin, cout, g) in itertools.product((1, 3, 5), ((1, 1), (2, 1), (1, 2), (2, 2)), channels):
        same = d * (k // 2)
        for padding in {same, 0, same + 1, (0, same + 2)}:
            reach = d * (k - 1)
            yield dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=padding, dilation=d,
                       groups=g, bias=(k + s + d + g) % 2 == 0), (9 + reach, 10 + reach)


@pytest.mark.parametrize('dtype', (torch.float64, torch.float32), ids=str)
def test_fused_equals_unfused_with_random_stats_in_every_bn(dtype: torch.dtype) -> None:
    cases = list(fuse_cases())
    assert len(cases) > 100
    worst = 0.0
    for args, size in cases:
        layer = settled(DBBConv2d(**args).double(), size)
        for norm in layer.norms():  # every BN, inner ones included, holds non-trivial values
            assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean)), args
            assert not torch.equal(norm.weight, torch.ones_like(norm.weight)), args
        layer = layer.to(dtype)
        x = torch.randn(2, args['in_channels'], *size, dtype=dtype)
        with torch.no_grad():
            ref = layer(x)
            conv = layer.fuse()
            assert type(conv) is nn.Conv2d and conv.bias is not None
            err = rel_err(ref, conv(x))
        assert err <= TOL[dtype], f'{dtype} {args}: relative error {err:.3e}'
        worst = max(worst, err)
    assert worst > 0


def test_fused_model_has_the_plain_layout() -> None:
    """Behind a BN (as in a ResNet) the fused bias folds into that BN: the
    state_dict is a plain conv-without-bias + BN's."""
    model = nn.Sequential(DBBConv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6))
    randomize_dbb_(model[0])
    model = settle_bn_(model, 4, (9, 8))
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_model(model)
        assert_rel_close(fused(x), ref, TOL[torch.float32], 'fuse_model')
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6))
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


# -- 3. plain checkpoints -----------------------------------------------------------------
@pytest.mark.parametrize('bias', (False, True))
@pytest.mark.parametrize('k,groups', ((1, 1), (3, 1), (3, 2), (3, 6), (7, 1)))
def test_plain_checkpoint_loads_function_preserving(k: int, groups: int, bias: bool) -> None:
    conv = nn.Conv2d(6, 6, k, 2, k // 2, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    layer = settled(DBBConv2d(6, 6, k, 2, k // 2, groups=groups, bias=bias))  # random values everywhere first
    state = conv.state_dict()
    layer.load_state_dict(state, strict=True)
    assert set(state) == set(conv.state_dict()), "load_state_dict changed the caller's dict"
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        assert_rel_close(layer.eval()(x), conv(x), 1e-6, 'eval output')
        assert_rel_close(layer.fuse()(x), conv(x), 1e-6, 'fused')
    # every other branch contributes zero, in training too: the block is its origin branch
    layer.train()
    with torch.no_grad():
        origin = layer.bn_origin(F.conv2d(x, layer.weight_origin, None, 2, k // 2, 1, groups))
        if bias:
            origin = origin + layer.bias.view(1, -1, 1, 1)
        assert_rel_close(layer(x), origin, 1e-6, 'train output')
    # the branches can still learn: their last BN's scale gets a gradient
    layer(x).square().sum().backward()
    for norm in layer.branch_output_norms()[1:]:
        assert norm.weight.grad.abs().sum() > 0
    # nested, with a prefix; a wrong shape is an error
    model = nn.Sequential(DBBConv2d(6, 6, k, 2, k // 2, groups=groups, bias=bias))
    model.load_state_dict(nn.Sequential(conv).state_dict(), strict=True)
    with torch.no_grad():
        assert_rel_close(model.eval()(x), conv(x), 1e-6, 'nested')
    wrong = nn.Conv2d(6, 6, k + 2, 2, k // 2 + 1, groups=groups, bias=bias)
    with pytest.raises(RuntimeError, match='size mismatch'):
        DBBConv2d(6, 6, k, 2, k // 2, groups=groups, bias=bias).load_state_dict(wrong.state_dict())


def test_single_init_starts_as_origin_conv_bn() -> None:
    layer = DBBConv2d(4, 6, 3, 1, 1, single_init=True)
    assert [float(n.weight.abs().max()) for n in layer.branch_output_norms()] == [1.0, 0.0, 0.0, 0.0]
    x = torch.randn(2, 4, 7, 7)
    assert_rel_close(layer(x), layer.bn_origin(F.conv2d(x, layer.weight_origin, None, 1, 1)) + layer.bias.view(
        1, -1, 1, 1), 1e-6, 'single_init')


# -- 4. norm types --------------------------------------------------------------------------
def test_norm_cfg_sets_the_type_of_every_bn() -> None:
    layer = DBBConv2d(4, 6, 3, 1, 1, norm_cfg=dict(type='SyncBN', requires_grad=False, momentum=0.3))
    assert len(layer.norms()) == 6
    for norm in layer.norms():
        assert isinstance(norm, nn.SyncBatchNorm) and norm.momentum == 0.3
        assert not any(p.requires_grad for p in norm.parameters())
    assert all(type(n) is nn.BatchNorm2d for n in DBBConv2d(4, 6, 3).norms())
    # SyncBN folds like BN: eval output == fused
    layer = settled(DBBConv2d(4, 6, 3, 1, 1, norm_cfg=dict(type='SyncBN')))
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        assert_rel_close(layer.fuse()(x), layer(x), 1e-5, 'SyncBN fused')


@pytest.mark.parametrize('norm_cfg', (dict(type='GN', num_groups=2), dict(type='LN'), dict(type='IN')), ids=str)
def test_norms_that_cannot_fold_are_refused(norm_cfg: dict) -> None:
    with pytest.raises(ValueError, match='cannot be folded'):
        DBBConv2d(4, 6, 3, 1, 1, norm_cfg=norm_cfg)
    with pytest.raises(ValueError, match='unknown norm_cfg type'):
        DBBConv2d(4, 6, 3, 1, 1, norm_cfg=dict(type='NoSuchNorm'))


# -- 5. the 'DBB' conv type: k x k convs only ---------------------------------------------------
def built(cfg: dict, *args, **kwargs) -> nn.Module:
    from mmcv.cnn import build_conv_layer
    return build_conv_layer(cfg, *args, **kwargs)


def test_dbb_conv_type_converts_only_kxk_convs() -> None:
    kinds: List[Tuple[int, type]] = [(1, nn.Conv2d), (3, DBBConv2d), (5, DBBConv2d), (7, nn.Conv2d), (2, nn.Conv2d)]
    for k, cls in kinds:
        for cfg in (dict(type='DBB'), dict(type='orepa_mm.DBB'), dict(type='DBB', norm_cfg=dict(type='SyncBN'))):
            layer = built(cfg, 4, 6, k, stride=2, padding=k // 2, bias=False)
            assert type(layer) is cls, (k, cfg)
            assert layer.stride == (2, 2) and layer.padding == (k // 2, k // 2) and layer.bias is None
        assert type(dbb_conv(4, 6, (k, k))) is cls
    assert type(dbb_conv(4, 6, (3, 1))) is nn.Conv2d  # non-square: plain
    # every conv, as a clearly named option, or the class itself
    for k in (1, 3, 7):
        assert type(built(dict(type='DBB', every_conv=True), 4, 6, k, padding=k // 2)) is DBBConv2d
        assert type(built(dict(type='DBBConv2d'), 4, 6, k, padding=k // 2)) is DBBConv2d
    assert isinstance(built(dict(type='DBB', norm_cfg=dict(type='SyncBN')), 4, 6, 3).bn_origin, nn.SyncBatchNorm)
    assert MODELS.get('DBB') is dbb_conv


def test_layer_constants_follow_copy() -> None:
    """A deep copy keeps working and independent (constants are buffers)."""
    layer = settled(DBBConv2d(4, 6, 3, 1, 1))
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x))
