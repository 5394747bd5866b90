"""The OREPA layer's ablation options (``branches=``, ``scaling=``): every
combination is one conv per forward that equals its literal branches run on
the feature map (outputs and every gradient, float64), fuses exactly, batches
with the layers of the same shape and options only, and loads a plain
checkpoint as that plain conv.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer
from torch import Tensor

from numerics import (  # noqa: F401  (_one_thread, _seed: autouse fixtures)
    TOL,
    _one_thread,
    _seed,
    assert_rel_close,
    block_identity,
    conv1x1,
    conv_with_generated_kernel,
    graph_names,
    per_channel,
    prior_basis,
    randomize_,
    settle_bn_,
)
from orepa_mm import fuse_model
from orepa_mm.layers import OREPAConv2d, batched_generation
from orepa_mm.layers.orepa import OREPA1x1Branches, OREPAKxKBranches, OREPAStackedBranches

pytestmark = pytest.mark.core

#: Branch sets of the paper's component ablation (cumulative), and a few odd ones.
BRANCH_SETS = {
    'all': None,
    'dbb_like': ('origin', 'avg', '1x1_kxk', '1x1'),
    'plus_prior': ('origin', 'avg', 'prior', '1x1_kxk', '1x1'),
    'plus_dws_l2i': ('origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws', 'l2i'),
    'origin_only': ('origin', ),
    'sparse': ('origin', 'prior', 'dws', 'deep_stem'),
}
SCALINGS = ('channel', 'scalar', 'none')


def literal_scale(generator: nn.Module, branch: str) -> Tensor:
    """The scale of ``branch`` as the option defines it: a vector, a scalar, or 1."""
    if generator.scaling == 'none':
        return torch.ones((), dtype=generator.weight_origin.dtype)
    return generator.branch_scales[generator.branch_names.index(branch)]


def scaled(y: Tensor, scale: Tensor) -> Tensor:
    return y * scale if scale.dim() == 0 else per_channel(y, scale.expand(y.shape[1]))


def kxk_literal(x: Tensor, br: OREPAKxKBranches, stride: int, groups: int) -> Tensor:
    """Each branch of the k x k block that ``br`` has, run on the feature map ('same' padding)."""
    k, cin, out = br.kernel_size, x.shape[1], br.out_channels
    p = k // 2
    run = {
        'origin': lambda: F.conv2d(x, br.weight_origin, None, stride, p, 1, groups),
        'avg': lambda: F.avg_pool2d(conv1x1(x, br.weight_avg, groups=groups), k, stride, p, count_include_pad=True),
        'prior': lambda: F.conv2d(conv1x1(x, br.weight_prior, groups=groups),
                                  prior_basis(out, k, x.dtype)[:, None], None, stride, p, 1, out),
        '1x1_kxk': lambda: F.conv2d(
            conv1x1(x, br.weight_1x1_kxk_first + block_identity(cin, groups, x.dtype), groups=groups),
            br.weight_1x1_kxk_second, None, stride, p, 1, groups),
        '1x1': lambda: conv1x1(x, br.weight_1x1, stride, groups=groups),
        'dws': lambda: conv1x1(F.conv2d(x, br.weight_dw, None, stride, p, 1, cin), br.weight_pw, groups=groups),
    }
    return sum(scaled(run[b](), literal_scale(br, b)) for b in br.branch_names)


def one_by_one_literal(x: Tensor, br: OREPA1x1Branches, stride: int, groups: int) -> Tensor:
    run = {
        'origin': lambda: conv1x1(x, br.weight_origin, stride, groups=groups),
        'l2i': lambda: conv1x1(conv1x1(x, br.weight_l2i_first, stride, groups=groups), br.weight_l2i_second,
                               groups=groups),
    }
    return sum(scaled(run[b](), literal_scale(br, b)) for b in br.branch_names)


def stacked_literal(x: Tensor, br: OREPAStackedBranches) -> Tensor:
    """Origin 7x7 plus the three 3x3 blocks, each run as its own literal
    branches, one after the other ('full' padding: nothing is cut)."""
    y = scaled(F.conv2d(x, br.weight_origin, None, 1, 6), literal_scale(br, 'origin'))
    if not br.stack:
        return y
    z = x
    for block in br.stack:
        z = kxk_literal(F.pad(z, (1, 1, 1, 1)), block, 1, br.groups)
    return y + scaled(z, literal_scale(br, 'deep_stem'))


def check_literal(layer: OREPAConv2d, x: Tensor, literal) -> None:
    """Output and every gradient (each parameter, the input) of the training-mode layer equal the literal branches'."""
    layer.train()
    x = x.detach().requires_grad_()
    out = layer(x)
    ref = literal(x) + layer.bias.view(1, -1, 1, 1)
    assert_rel_close(out, ref, TOL[torch.float64], 'output')
    names, params = zip(*layer.named_parameters())
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (*params, x), grad_out)
    want = torch.autograd.grad(ref, (*params, x), grad_out, allow_unused=True)
    for name, g, w in zip((*names, 'input'), got, want):
        assert w is not None, f'{name} does not reach the literal branches: a parameter of no branch'
        assert_rel_close(g, w, 1e-10, f'grad of {name}')


def build(k: int, branches: Optional[Sequence[str]], scaling: str, cin: int = 4, cout: int = 6, stride: int = 1,
          padding: Optional[int] = None, groups: int = 1) -> OREPAConv2d:
    layer = OREPAConv2d(cin, cout, k, stride, k // 2 if padding is None else padding, groups=groups,
                        branches=branches, scaling=scaling)
    return randomize_(layer).double()


# -- the literal branches -------------------------------------------------------------------
@pytest.mark.parametrize('scaling', SCALINGS)
@pytest.mark.parametrize('branch_set', BRANCH_SETS)
@pytest.mark.parametrize('stride,groups', ((1, 1), (2, 2)))
def test_kxk_block_equals_its_literal_branches(branch_set: str, scaling: str, stride: int, groups: int) -> None:
    layer = build(3, BRANCH_SETS[branch_set], scaling, stride=stride, groups=groups)
    wanted = BRANCH_SETS[branch_set] or OREPAKxKBranches.BRANCHES
    assert layer.branches.branch_names == tuple(b for b in OREPAKxKBranches.BRANCHES if b in wanted)
    check_literal(layer, torch.randn(2, 4, 9, 7, dtype=torch.float64),
                  lambda t: kxk_literal(t, layer.branches, stride, groups))


@pytest.mark.parametrize('scaling', SCALINGS)
@pytest.mark.parametrize('branch_set', ('all', 'origin_only'))
@pytest.mark.parametrize('channels', ((4, 6), (6, 4)))
def test_1x1_block_equals_its_literal_branches(branch_set: str, scaling: str, channels) -> None:
    cin, cout = channels
    layer = build(1, BRANCH_SETS[branch_set], scaling, cin, cout, stride=2, groups=2)
    check_literal(layer, torch.randn(2, cin, 9, 7, dtype=torch.float64),
                  lambda t: one_by_one_literal(t, layer.branches, 2, 2))


@pytest.mark.parametrize('scaling', SCALINGS)
@pytest.mark.parametrize('branch_set', ('all', 'dbb_like', 'sparse'))
def test_stacked_block_equals_its_literal_branches(branch_set: str, scaling: str) -> None:
    layer = build(7, BRANCH_SETS[branch_set], scaling, padding=6)
    assert len(layer.branches.stack) == (3 if 'deep_stem' in (BRANCH_SETS[branch_set] or ('deep_stem', )) else 0)
    check_literal(layer, torch.randn(2, 4, 8, 9, dtype=torch.float64), lambda t: stacked_literal(t, layer.branches))


# -- fuse, plain checkpoints, initialisation ---------------------------------------------------
@pytest.mark.parametrize('scaling', SCALINGS)
@pytest.mark.parametrize('branch_set', BRANCH_SETS)
def test_fuses_exactly(branch_set: str, scaling: str) -> None:
    """A conv-BN-ReLU stack of the three block kinds, eval mode with settled BN statistics, float64."""
    cfg = dict(type='OREPA', branches=BRANCH_SETS[branch_set], scaling=scaling)
    model = nn.Sequential(build_conv_layer(cfg, 3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), build_conv_layer(cfg, 8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), build_conv_layer(cfg, 8, 6, 1, bias=True))
    model = settle_bn_(randomize_(model).double(), 3, (16, 18))
    x = torch.randn(2, 3, 16, 18, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_model(copy.deepcopy(model))
        assert not any(isinstance(m, OREPAConv2d) for m in fused.modules())
        assert_rel_close(fused(x), expected, 1e-10, 'fused output')


@pytest.mark.parametrize('scaling', SCALINGS)
@pytest.mark.parametrize('k', (1, 3, 7))
def test_plain_checkpoint_and_single_init_give_the_plain_conv(k: int, scaling: str) -> None:
    plain = nn.Conv2d(4, 6, k, padding=k // 2, bias=False).double()
    layer = randomize_(OREPAConv2d(4, 6, k, padding=k // 2, bias=False, scaling=scaling)).double()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(layer.train()(x), plain(x), 1e-12, 'plain checkpoint')
    single = OREPAConv2d(4, 6, k, padding=k // 2, bias=False, single_init=True, scaling=scaling).double()
    with torch.no_grad():
        origin = single.branches.weight_origin.reshape(6, 4, k, k)
        assert_rel_close(single(x), F.conv2d(x, origin, None, 1, k // 2), 1e-12, 'single_init')


def test_default_is_the_paper_block() -> None:
    """The defaults build exactly the parameters existing checkpoints hold."""
    names = {k: [n for n, _ in OREPAConv2d(4, 6, k, padding=k // 2, bias=False).named_parameters()] for k in (1, 3)}
    assert names[3] == ['branches.weight_origin', 'branches.weight_avg', 'branches.weight_prior',
                        'branches.weight_1x1', 'branches.weight_1x1_kxk_first', 'branches.weight_1x1_kxk_second',
                        'branches.weight_dw', 'branches.weight_pw', 'branches.branch_scales']
    assert names[1] == ['branches.weight_origin', 'branches.weight_l2i_first', 'branches.weight_l2i_second',
                        'branches.branch_scales']
    assert OREPAConv2d(4, 6, 3).branches.branch_scales.shape == (6, 6)
    assert OREPAConv2d(4, 6, 3, scaling='scalar').branches.branch_scales.shape == (6, 1)
    assert not hasattr(OREPAConv2d(4, 6, 3, scaling='none').branches, 'branch_scales')


@pytest.mark.parametrize('kwargs,message', (
    (dict(branches=('origin', 'avgpool')), "unknown OREPA branch\\(es\\) \\['avgpool'\\]"),
    (dict(branches=('avg', '1x1')), "'origin' is required"),
    (dict(branches='origin'), 'give a sequence of branch names'),
    (dict(scaling='vector'), "scaling='vector': choose one of"),
))
def test_bad_options_are_refused(kwargs: Dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OREPAConv2d(4, 6, 3, **kwargs)


# -- batched generation --------------------------------------------------------------------------
def test_groups_follow_the_options() -> None:
    """Same-shape layers with different options generate in different groups,
    each exact against its own per-layer definition; same options share one."""
    batched_generation._GROUPS.clear()
    options = [dict(), dict(scaling='scalar'), dict(scaling='none'), dict(branches=BRANCH_SETS['dbb_like']),
               dict(scaling='scalar')]
    layers = nn.ModuleList(randomize_(OREPAConv2d(4, 4, 3, padding=1, **o)).double().train() for o in options)
    twins = copy.deepcopy(layers)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = x
    for layer in layers:
        out = torch.tanh(layer(out))
    ref = x
    for twin in twins:
        ref = torch.tanh(conv_with_generated_kernel(twin, ref))
    assert_rel_close(out, ref, 1e-12, 'output')
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(layers.named_parameters(), twins.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-10, f'grad of {name}')
    sizes = sorted(len(g.members) for g in batched_generation._GROUPS.values())
    assert sizes == [1, 1, 1, 2], sizes  # the two 'scalar' layers share a generation
    assert any('GroupGenerate' in n for n in graph_names(out))
    batched_generation._GROUPS.clear()
