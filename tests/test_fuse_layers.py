"""Fused vs unfused: every OREPA/DBB layer equals its ``fuse()`` conv in eval
mode, with a BN after it holding non-trivial statistics, across kernel sizes,
strides, paddings, dilations, groups and padding modes.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterator, Tuple

import pytest
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from numerics import (  # noqa: F401  (_one_thread, _seed: autouse fixtures)
    CHANNELS,
    LAYER_CLASSES,
    SIZES,
    TOL,
    _one_thread,
    _seed,
    assert_rel_close,
    randomize_,
    settle_bn_,
    shapes,
)
from orepa_mm.fuse import fuse_model
from orepa_mm.layers import DBBConv2d, OREPAConv2d, ReparamConv2d
from slim_resnet import SlimResNet

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


# -- 1. fused vs unfused ---------------------------------------------------------
def padding_choices(k: int, dilation: int) -> tuple:
    """'Same' padding, none, larger than 'same', and an asymmetric pair."""
    same = dilation * (k // 2)
    return same, 0, same + 2, (0, same + 1)


def sweep_cases(k: int) -> Iterator[Tuple[dict, Tuple[int, int]]]:
    """A pairwise covering of stride x dilation x channels/groups x padding x
    bias (every pair of values of any two factors occurs) in 24 cases."""
    for (s, stride), (d, dilation), (c, (cin, cout, groups)) in itertools.product(
            enumerate((1, 2)), enumerate((1, 2, 3)), enumerate(CHANNELS)):
        p = (c + d + 2 * s) % 4
        padding = padding_choices(k, dilation)[p]
        base = SIZES[(s + p) % 2]
        reach = dilation * (k - 1)
        ph, pw = _pair(padding)
        size = (base[0] + max(0, reach - 2 * ph), base[1] + max(0, reach - 2 * pw))
        yield dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride, padding=padding,
                   dilation=dilation, groups=groups, bias=(c + s + (d == 1)) % 2 == 1), size


@torch.no_grad()
def check_fused_model(model: nn.Sequential, x: Tensor, args: dict, tol: float, what: str) -> None:
    """``fuse_model`` and ``layer.fuse()`` of ``Sequential(layer, bn)`` compute what it computes."""
    ref = model(x)
    fused = fuse_model(model)
    assert not any(isinstance(m, (ReparamConv2d, OREPAConv2d, DBBConv2d)) for m in fused.modules()), what
    conv = fused[0]
    assert type(conv) is nn.Conv2d, what
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == \
        (model[0].stride, model[0].padding, model[0].dilation, model[0].groups), what
    assert_rel_close(fused(x), ref, tol, f'{what}: fuse_model')
    plain = nn.Sequential(nn.Conv2d(**args), nn.BatchNorm2d(args['out_channels']))
    assert shapes(fused.state_dict()) == shapes(plain.state_dict()), what
    # fuse_model copied: the original model is untouched
    assert isinstance(model[0], ReparamConv2d), what
    assert torch.equal(model(x), ref), f'{what}: fuse_model changed its input model'
    # fusing a fused model is harmless
    again = fuse_model(fused)
    assert shapes(again.state_dict()) == shapes(fused.state_dict()), what
    assert torch.equal(again(x), fused(x)), f'{what}: second fuse_model'
    # layer.fuse() (a conv with the layer's own bias flag for OREPA; DBB's fused conv always has a bias)
    single = model[0].fuse()
    assert type(single) is nn.Conv2d and not single.training, what
    assert_rel_close(model[1](single(x)), ref, tol, f'{what}: layer.fuse()')


@pytest.mark.parametrize('k', (1, 3, 5, 7))
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_fuse_matches_unfused_sweep(cls: type, k: int) -> None:
    for args, size in sweep_cases(k):
        what = f'{cls.__name__}({args}) on {size}'
        layer = randomize_(cls(**args))
        model = settle_bn_(nn.Sequential(layer, nn.BatchNorm2d(args['out_channels'])).double(),
                           args['in_channels'], size)
        x = torch.randn(2, args['in_channels'], *size, dtype=torch.float64)
        check_fused_model(model, x, args, TOL[torch.float64], f'float64 {what}')
        check_fused_model(copy.deepcopy(model).float(), x.float(), args, TOL[torch.float32], f'float32 {what}')


@pytest.mark.parametrize('padding_mode', ('reflect', 'replicate', 'circular'))
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_fuse_matches_unfused_padding_modes(cls: type, padding_mode: str) -> None:
    for k, stride, dilation in ((1, 1, 1), (3, 2, 2), (7, 1, 1)):
        padding = (dilation * (k // 2), dilation * (k // 2) + 1) if k > 1 else 0
        args = dict(in_channels=4, out_channels=6, kernel_size=k, stride=stride, padding=padding,
                    dilation=dilation, groups=2, bias=False)
        layer = randomize_(cls(**args, padding_mode=padding_mode))
        model = settle_bn_(nn.Sequential(layer, nn.BatchNorm2d(6)).double(), 4, (11, 9))
        x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
        with torch.no_grad():
            ref = model(x)
            fused = fuse_model(model)
            assert fused[0].padding_mode == padding_mode
            assert_rel_close(fused(x), ref, TOL[torch.float64], f'{cls.__name__} k={k} {padding_mode}')


@pytest.mark.parametrize('k', (1, 3, 7))
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_fuse_matches_unfused_anisotropic(cls: type, k: int) -> None:
    """Different stride, padding and dilation along height and width."""
    args = dict(in_channels=4, out_channels=6, kernel_size=k, stride=(1, 2), padding=(k // 2, 2 * (k // 2) + 1),
                dilation=(1, 2), groups=2, bias=False)
    model = settle_bn_(nn.Sequential(randomize_(cls(**args)), nn.BatchNorm2d(6)).double(), 4, (11, 13))
    check_fused_model(model, torch.randn(2, 4, 11, 13, dtype=torch.float64), args, TOL[torch.float64], str(args))


def test_fuse_model_inplace_and_single_layer() -> None:
    for cls in LAYER_CLASSES:
        layer = randomize_(cls(4, 6, 3, padding=1, bias=True)).double()
        model = settle_bn_(nn.Sequential(layer, nn.BatchNorm2d(6)).double(), 4, (9, 7))
        x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
        with torch.no_grad():
            ref = model(x)
            conv = fuse_model(model[0])  # a bare layer fuses to its conv
            assert type(conv) is nn.Conv2d
            assert_rel_close(model[1](conv(x)), ref, TOL[torch.float64], cls.__name__)
            out = fuse_model(model, inplace=True)
            assert out is model and type(model[0]) is nn.Conv2d
            assert_rel_close(model(x), ref, TOL[torch.float64], cls.__name__)




@pytest.mark.parametrize('conv_cfg', [dict(type='OREPA'), dict(type='DBB'), dict(type='DBB', every_conv=True)],
                         ids=['OREPA', 'DBB', 'DBB-every-conv'])
def test_resnet_trains_a_step_and_fuses(conv_cfg: dict, device: torch.device) -> None:
    """A ResNet of re-param layers takes an SGD step, gets non-trivial BN
    statistics, and fuses into plain convs that compute the same (float64)."""
    model = SlimResNet(depth=18, base_channels=8, conv_cfg=conv_cfg).double()
    for layer in model.modules():
        if isinstance(layer, ReparamConv2d):
            randomize_(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sum(out.square().mean() for out in model(x)).backward()
    opt.step()
    settle_bn_(model, 3, (32, 32))
    fused = fuse_model(model)
    assert not any(isinstance(m, ReparamConv2d) for m in fused.modules())
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in fused.modules()), 'a bias was left'
    with torch.no_grad():
        for got, expected in zip(fused(x), model(x)):
            assert_rel_close(got, expected, 1e-10, str(conv_cfg))
