"""mmengine's initialisers act on OREPA and DBB convs: a write into the
layer's ``weight`` (``normal_init``, ``constant_init``, ``kaiming_init``,
``xavier_init``, ``init_cfg`` with ``layer=`` or ``override=``) makes the
layer that initialised conv (origin branch = the written kernel, the other
branches off), exactly, in eval mode; the bias gets the requested value."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_conv_layer
from mmengine.model import BaseModule, bias_init_with_prob, constant_init, kaiming_init, normal_init, xavier_init

import orepa_mm  # noqa: F401 - registers the conv types
from numerics import _one_thread  # noqa: F401 - autouse fixture: tiny tensors, one intra-op thread
from orepa_mm.layers import DBBConv2d, OREPAConv2d, ReparamConv2d

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core

LAYERS = [OREPAConv2d, DBBConv2d]
#: (in, out, kernel, groups): a 3x3, a 1x1, a depthwise 3x3 and the 7x7 stem.
SHAPES = [(8, 16, 3, 1), (8, 16, 1, 1), (16, 16, 3, 16), (3, 16, 7, 1)]


def _layer(cls, shape, bias: bool = True) -> ReparamConv2d:
    cin, cout, k, g = shape
    torch.manual_seed(0)
    return cls(cin, cout, k, padding=k // 2, groups=g, bias=bias)


def _effective(layer: ReparamConv2d):
    """Kernel and bias the layer computes in eval mode."""
    layer.eval()
    conv = layer.fuse()
    return conv.weight.detach(), (None if conv.bias is None else conv.bias.detach())


def _assert_computes(layer: ReparamConv2d, kernel: torch.Tensor, bias) -> None:
    x = torch.randn(2, layer.in_channels, 9, 9)
    layer.eval()
    with torch.no_grad():
        got = layer(x)
        want = F.conv2d(x, kernel, bias, 1, layer.padding, 1, layer.groups)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, f'{type(layer).__name__}: computes another conv than the initialised one ({err:.1e})'


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: f'{s[0]}-{s[1]}-k{s[2]}-g{s[3]}')
@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_normal_init_makes_the_layer_that_conv(cls, shape) -> None:
    layer = _layer(cls, shape)
    written = layer.weight  # as the initialisers do: write into what ``weight`` hands out
    nn.init.normal_(written, std=0.01)
    assert torch.equal(_effective(layer)[0], written.detach()), 'the effective kernel is not the written one'
    layer = _layer(cls, shape)
    normal_init(layer, std=0.01, bias=0.5)
    kernel, bias = _effective(layer)
    assert abs(kernel.std().item() - 0.01) < 0.003, f'std {kernel.std().item():.4f} of a normal_init(std=0.01)'
    assert torch.allclose(bias, torch.full_like(bias, 0.5), atol=1e-6)
    _assert_computes(layer, kernel, bias)


@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_constant_kaiming_xavier_init(cls) -> None:
    cin, cout, k, g = SHAPES[0]
    layer = _layer(cls, SHAPES[0])
    constant_init(layer, 0.25, bias=-1.0)
    kernel, bias = _effective(layer)
    assert torch.allclose(kernel, torch.full_like(kernel, 0.25)) and torch.allclose(bias, -torch.ones_like(bias))

    layer = _layer(cls, SHAPES[0], bias=False)
    kaiming_init(layer, mode='fan_out', nonlinearity='relu', distribution='normal')
    kernel, bias = _effective(layer)
    expected = math.sqrt(2 / (cout * k * k))
    assert abs(kernel.std().item() / expected - 1) < 0.15, 'kaiming_init: std of the effective kernel'
    assert bias is None or cls is DBBConv2d and torch.count_nonzero(bias) == 0

    layer = _layer(cls, SHAPES[0])
    xavier_init(layer, distribution='uniform')
    kernel, _ = _effective(layer)
    bound = math.sqrt(6 / (cin * k * k + cout * k * k))
    assert kernel.abs().max() <= bound and abs(kernel.std().item() / (bound / math.sqrt(3)) - 1) < 0.15
    _assert_computes(layer, kernel, layer.fuse().bias)


class _Head(BaseModule):
    """A head as mmdet writes them: ConvModules and a classifier conv, all from ``conv_cfg``."""

    def __init__(self, conv_cfg: dict, init_cfg: dict) -> None:
        super().__init__(init_cfg=init_cfg)
        self.shared = ConvModule(8, 8, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=None)
        self.cls = build_conv_layer(conv_cfg, 8, 6, 3, padding=1)


@pytest.mark.parametrize('kind', ['OREPA', 'DBB'])
def test_init_cfg_layer_and_override(kind: str) -> None:
    """RetinaHead's init: ``Normal`` on the convs by ``layer=``, the classifier
    by ``override=dict(name=...)`` with ``bias_prob``."""
    init_cfg = dict(type='Normal', layer='ReparamConv2d', std=0.01,
                    override=dict(type='Normal', name='cls', std=0.01, bias_prob=0.01))
    torch.manual_seed(0)
    head = _Head(dict(type=kind), init_cfg)
    head.init_weights()
    for name in ('shared.conv', 'cls'):
        kernel, bias = _effective(head.get_submodule(name))
        assert abs(kernel.std().item() - 0.01) < 0.003, f'{kind} {name}: std {kernel.std().item():.4f}'
    _, bias = _effective(head.cls)
    assert torch.allclose(bias, torch.full_like(bias, bias_init_with_prob(0.01)), atol=1e-5), 'bias_prob'


@pytest.mark.parametrize('kind', ['OREPA', 'DBB'])
def test_layer_conv2d_keeps_the_branch_design(kind: str) -> None:
    """mmengine selects ``layer=`` by class name and direct bases:
    ``'Conv2d'`` (a backbone's default Kaiming) does not reach these layers."""
    torch.manual_seed(0)
    head = _Head(dict(type=kind), dict(type='Normal', layer='Conv2d', std=0.01))
    before = copy.deepcopy(head.cls.state_dict())
    head.init_weights()
    after = head.cls.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != 'bias')


@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_checkpoint_after_init_wins_and_copies_keep_the_init(cls) -> None:
    layer = _layer(cls, SHAPES[0])
    normal_init(layer, std=0.01)
    twin = copy.deepcopy(layer)  # the pending write travels with the copy
    kernel, bias = _effective(twin)
    assert abs(kernel.std().item() - 0.01) < 0.003
    other = _layer(cls, SHAPES[0])
    nn.init.normal_(other.bias)
    layer2 = _layer(cls, SHAPES[0])
    normal_init(layer2, std=0.01)
    layer2.load_state_dict(other.state_dict())  # a checkpoint loaded after the init replaces it
    k2, b2 = _effective(layer2)
    k_other, b_other = _effective(other)
    assert torch.equal(k2, k_other) and torch.equal(b2, b_other)


@pytest.mark.parametrize('write', ['data-assign', 'data-inplace'])
@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_writes_through_data_are_not_lost(cls, write: str) -> None:
    """``weight.data = kernel`` (some re-param blocks' own ``switch_to_deploy``)
    and ``weight.data.normal_()`` (older init code) bump no version counter of
    the handed-out tensor; the layer still becomes the written conv."""
    layer = _layer(cls, SHAPES[0])
    torch.manual_seed(1)
    kernel = torch.randn_like(layer.weight.detach())
    if write == 'data-assign':
        layer.weight.data = kernel
    else:
        layer.weight.data.copy_(kernel)
    _assert_computes(layer, kernel, layer.bias.detach())


@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_reading_weight_changes_nothing(cls) -> None:
    layer = _layer(cls, SHAPES[0]).eval()  # (DBB's BNs would update their statistics in training)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.weight.sum()
    layer(torch.randn(1, 8, 5, 5))
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('cls', LAYERS, ids=lambda c: c.__name__)
def test_weight_of_another_shape_is_refused(cls) -> None:
    layer = _layer(cls, SHAPES[0])
    layer.weight.data = torch.zeros(4, 8, 3, 3)
    with pytest.raises(ValueError, match=r'shape \(4, 8, 3, 3\).*\(16, 8, 3, 3\)'):
        layer(torch.randn(1, 8, 5, 5))
