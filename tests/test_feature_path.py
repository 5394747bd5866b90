"""Branches computed on the feature map (``orepa_mm.layers.feature_path``).

The choice only changes how a training step computes the layer's function:
every test compares a step with the two-conv branches on the feature map
(``feature_path='always'`` or the automatic choice) against the same layer
or model with every branch in the kernel (``'never'``), in float64, outputs
and gradients relative to their own scale.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer

from numerics import TOL, _one_thread, _seed, assert_rel_close, randomize_  # noqa: F401  (autouse fixtures)
from orepa_mm import OREPAConv2d, feature_path_report, fuse_model
from orepa_mm.layers import batched_generation
from orepa_mm.layers.feature_path import FEATURE_PATH_OPERATORS, plan_for
from slim_resnet import SlimResNet

# The benchmark's counters: operators dispatched and bytes kept for backward.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))
from benchmark_lib import counters  # noqa: E402

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core

TOL64 = TOL[torch.float64]


@pytest.fixture(autouse=True)
def _fresh_groups():
    batched_generation._GROUPS.clear()
    yield
    batched_generation._GROUPS.clear()


def twin(layer: nn.Module, feature_path: str) -> nn.Module:
    other = copy.deepcopy(layer)
    for m in other.modules():
        if isinstance(m, OREPAConv2d):
            m.feature_path = feature_path
    return other


def step_grads(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Output and every gradient (input included) of one weighted-sum loss."""
    x = x.clone().requires_grad_()
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    result = {f'out{i}': o.detach() for i, o in enumerate(outs)}
    result.update({'input': grads[0], **{n: g for n, g in zip(names, grads[1:]) if g is not None}})
    return result


def assert_same(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], tol: float = TOL64) -> None:
    assert expected.keys() == got.keys(), sorted(set(expected) ^ set(got))
    for name in expected:
        assert_rel_close(got[name], expected[name], tol, name)


# -- one layer ----------------------------------------------------------------------
LAYER_CASES = [  # (in, out, k, stride, padding, dilation, groups, padding_mode, scaling)
    (6, 8, 3, 1, 1, 1, 1, 'zeros', 'channel'),
    (6, 8, 3, 2, 1, 1, 2, 'zeros', 'channel'),
    (8, 8, 3, 1, 2, 2, 1, 'reflect', 'channel'),
    (10, 10, 3, 1, 1, 1, 5, 'zeros', 'channel'),  # groups > 4: internal width 2 * in
    (6, 6, 5, 2, 2, 1, 1, 'circular', 'scalar'),
    (6, 8, 3, 1, 0, 1, 1, 'zeros', 'none'),
    (8, 6, 1, 1, 0, 1, 1, 'zeros', 'channel'),
    (6, 8, 1, 2, 0, 1, 2, 'zeros', 'scalar'),
    (8, 8, 1, 1, 1, 1, 1, 'zeros', 'none'),  # a padded 1x1 conv
]


@pytest.mark.parametrize('cin,cout,k,stride,padding,dilation,groups,padding_mode,scaling', LAYER_CASES)
def test_layer_step_on_features_equals_the_kernel_path(cin, cout, k, stride, padding, dilation, groups, padding_mode,
                                                       scaling) -> None:
    layer = OREPAConv2d(cin, cout, k, stride, padding, dilation, groups, padding_mode=padding_mode, scaling=scaling,
                        feature_path='always').double()
    randomize_(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layer.train()
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    got = step_grads(layer, x)
    assert layer.feature_plan is not None and layer.feature_plan.on_features
    expected = step_grads(twin(layer, 'never'), x)
    assert_same(expected, got)


def test_blocks_without_the_branch_have_no_plan() -> None:
    layer = OREPAConv2d(4, 4, 3, padding=1, branches=('origin', 'avg'), feature_path='always').train()
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    assert layer.feature_plan is None
    stem = OREPAConv2d(3, 4, 7, padding=3, feature_path='always').train()  # the stacked large kernel
    stem(torch.randn(1, 3, 9, 9)).sum().backward()
    assert stem.feature_plan is None


def test_bfloat16_autocast_step_is_close_to_float32() -> None:
    layer = randomize_(OREPAConv2d(8, 8, 3, padding=1, feature_path='always')).train()
    x = torch.randn(2, 8, 10, 10)
    expected = step_grads(twin(layer, 'never'), x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = step_grads(layer, x)
    assert got['out0'].dtype == torch.bfloat16
    for name, g in expected.items():
        assert_rel_close(got[name].float(), g, 5e-2, name)


# -- the automatic choice ---------------------------------------------------------------
def resnet50_conv(cin: int, cout: int, k: int, stride: int = 1) -> OREPAConv2d:
    return OREPAConv2d(cin, cout, k, stride, k // 2, bias=False)


@pytest.mark.parametrize('layer,size,batch,on_features', [
    (lambda: resnet50_conv(512, 512, 3), 7, 4, True),  # ResNet-50 layer4 3x3: wide, small map
    (lambda: resnet50_conv(512, 512, 3), 7, 16, False),
    (lambda: resnet50_conv(512, 512, 3, 2), 14, 4, True),
    (lambda: resnet50_conv(64, 64, 3), 56, 1, False),  # layer1: narrow, large map
    (lambda: resnet50_conv(2048, 512, 1), 7, 4, True),  # layer4 conv1 (l2i)
    (lambda: resnet50_conv(2048, 512, 1), 7, 16, False),
    (lambda: resnet50_conv(256, 64, 1), 56, 1, False),
])
def test_auto_choice_follows_the_cost_model(layer, size: int, batch: int, on_features: bool) -> None:
    layer = layer()
    plan = plan_for(layer, (batch, layer.in_channels, size, size), layer.padding, 4)
    assert plan.on_features is on_features, plan
    assert plan.on_features == (plan.feature_macs + plan.overhead_macs < plan.kernel_macs
                                and plan.feature_bytes <= plan.kernel_bytes)


def test_the_choice_never_keeps_more_than_a_kernel() -> None:
    """Over many shapes: chosen exactly when cheaper and within the budget,
    and never keeping a map larger than the layer's kernel."""
    chosen = 0
    for cin, cout, k, stride, groups in [(64, 64, 3, 1, 1), (512, 512, 3, 2, 1), (32, 64, 1, 2, 1), (40, 40, 3, 1, 8),
                                         (2048, 512, 1, 1, 1), (24, 24, 5, 2, 6)]:
        layer = OREPAConv2d(cin, cout, k, stride, k // 2, groups=groups)
        for batch in (1, 2, 8):
            for size in (1, 3, 7, 14, 28):
                plan = plan_for(layer, (batch, cin, size, size), layer.padding, 4)
                assert plan.on_features == (plan.feature_macs + plan.overhead_macs < plan.kernel_macs
                                            and plan.feature_bytes <= plan.kernel_bytes)
                chosen += plan.on_features
                assert not plan.on_features or plan.feature_bytes <= plan.kernel_bytes
    assert chosen > 0


@pytest.mark.parametrize('k', [3, 1])
def test_operators_and_bytes_the_feature_map_adds(k: int) -> None:
    """What the cost model prices (operators) and what it budgets (the
    intermediate map) are what a step really adds, counted exactly."""
    layers = 3
    counts, saved = {}, {}
    for feature_path in ('never', 'always'):
        torch.manual_seed(0)
        model = nn.Sequential(*[OREPAConv2d(16, 16, k, padding=k // 2, bias=False, feature_path=feature_path)
                                for _ in range(layers)]).train()
        x = torch.randn(2, 16, 8, 8, requires_grad=True)

        def step() -> None:
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
        step()
        step()
        counts[feature_path] = counters.count_ops(step)[0].total
        with counters.SavedTensorCounter(lambda: counters.model_tensors(model)) as counter:
            out = model(x)
        saved[feature_path] = counter.nbytes
        del out
    plan = model[0].feature_plan
    assert 0 < counts['always'] - counts['never'] <= layers * FEATURE_PATH_OPERATORS[plan.branch]
    assert saved['always'] - saved['never'] <= layers * plan.feature_bytes


# -- whole models -----------------------------------------------------------------------
def slim_resnet(feature_path: str) -> nn.Module:
    torch.manual_seed(0)
    model = SlimResNet(depth=50, base_channels=16, conv_cfg=dict(type='OREPA', feature_path=feature_path)).double()
    for m in model.modules():
        if isinstance(m, OREPAConv2d):
            randomize_(m)
    return model.train()


def test_optimizer_steps_with_mixed_choices_match_the_kernel_path() -> None:
    """The automatic choice puts some layers of one shape on the feature map
    and others not (different input sizes); several SGD steps stay exact."""
    models = [slim_resnet('auto'), slim_resnet('never')]
    # (batch 2 and 64x64: every BatchNorm normalises enough values for its
    # gradients to be well conditioned; batch 1 and 2x2 maps are not)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for model in models:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(3):
            loss = sum((o * o).mean() for o in model(x))
            loss.backward()
            opt.step()
            opt.zero_grad()
    plans = feature_path_report(models[0])
    assert any(r['on_features'] for r in plans) and not all(r['on_features'] for r in plans)
    assert not any(r['on_features'] for r in feature_path_report(models[1]))
    auto, never = (dict(m.named_parameters()) for m in models)
    for name in never:
        assert_rel_close(auto[name].detach(), never[name].detach(), 1e-10, name)
    # Three momentum steps through 50 layers amplify float64 rounding: scaling
    # one weight by (1 + 1e-15) moves these outputs and gradients by as much.
    assert_same(step_grads(models[1], x), step_grads(models[0], x), 1e-8)


@pytest.mark.parametrize('reentrant', [False, True])
def test_with_cp_and_shared_convs(monkeypatch, reentrant: bool) -> None:
    """Activation checkpointing (the forward runs again in backward), and a
    layer called twice before one backward (a head shared by FPN levels)."""
    import torch.utils.checkpoint as cp
    original = cp.checkpoint
    monkeypatch.setattr(cp, 'checkpoint', lambda fn, *a, **kw: original(fn, *a, use_reentrant=reentrant))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def checkpointed_step(feature_path: str) -> Dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = SlimResNet(depth=50, base_channels=16, with_cp=True,
                           conv_cfg=dict(type='OREPA', feature_path=feature_path)).double()
        for m in model.modules():
            if isinstance(m, OREPAConv2d):
                randomize_(m)
        inputs = x.clone().requires_grad_()
        # backward(), not autograd.grad(): reentrant checkpointing supports only that
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in model.train()(inputs)).backward()
        return {'input': inputs.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    assert_same(checkpointed_step('never'), checkpointed_step('always'), 1e-10)

    shared = randomize_(OREPAConv2d(8, 8, 3, padding=1, feature_path='always')).double().train()
    levels = [torch.randn(2, 8, s, s, dtype=torch.float64) for s in (8, 4)]

    class TwoLevels(nn.Module):
        def __init__(self, conv: nn.Module) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> list:
            return [self.conv(level * x.mean()) for level in levels]
    one = torch.ones(1, dtype=torch.float64)
    assert_same(step_grads(TwoLevels(twin(shared, 'never')), one), step_grads(TwoLevels(shared), one))


def test_eval_and_fuse_use_the_whole_kernel() -> None:
    model = slim_resnet('always')
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sum(o.sum() for o in model(x)).backward()
    assert all(r['on_features'] for r in feature_path_report(model))
    model.eval()
    with torch.no_grad():
        unfused = model(x)
        fused = fuse_model(copy.deepcopy(model))(x)
        kernel_path = twin(model, 'never')(x)
    for a, b, c in zip(unfused, fused, kernel_path):
        assert_rel_close(a, c, TOL64, 'unfused eval')
        assert_rel_close(b, c, 1e-10, 'fused eval')


def test_report_lists_each_layer_with_its_costs() -> None:
    model = slim_resnet('auto')
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    rows: List[dict] = feature_path_report(model)
    names = {name for name, m in model.named_modules() if isinstance(m, OREPAConv2d) and m.kernel_size[0] < 7}
    assert {r['layer'] for r in rows} == names
    for r in rows:
        assert r['branch'] in ('1x1_kxk', 'l2i') and r['kernel_macs'] > 0 and r['feature_macs'] > 0


# -- the option ---------------------------------------------------------------------------
def test_option_through_conv_cfg_and_bad_values() -> None:
    layer = build_conv_layer(dict(type='OREPA', feature_path='never'), 4, 4, 3, padding=1)
    assert isinstance(layer, OREPAConv2d) and layer.feature_path == 'never'
    with pytest.raises(ValueError, match="feature_path must be one of .* got 'sometimes'"):
        OREPAConv2d(4, 4, 3, feature_path='sometimes')


# -- the generators without a branch --------------------------------------------------------
@pytest.mark.parametrize('cin,cout,k,groups', [(4, 6, 3, 1), (6, 6, 3, 3), (10, 10, 3, 5), (6, 4, 1, 2), (4, 6, 1, 1)])
def test_generator_without_the_feature_branch_matches_its_reference(cin, cout, k, groups) -> None:
    generator = randomize_(OREPAConv2d(cin, cout, k, 1, k // 2, groups=groups)).double().branches
    branch = '1x1_kxk' if k > 1 else 'l2i'
    generator.kernel_without = (branch, )
    names, params = zip(*generator.named_parameters())
    reference = generator.reference_kernel()
    full = sum(v for b, v in generator.branch_kernels().items() if b != branch)
    assert_rel_close(reference, full, TOL64, 'reference without the branch')
    assert_rel_close(generator.generate(), reference, TOL64, 'generated kernel')
    grad = torch.randn_like(reference)
    want = dict(zip(names, torch.autograd.grad(reference, params, grad, allow_unused=True)))
    got = generator.kernel_backward(grad)
    for name in names:
        if name in got:
            assert_rel_close(got[name], want[name], TOL64, name)
        else:  # left out: the branch's own factors, which the kernel does not depend on
            assert want[name] is None and branch in name, name
