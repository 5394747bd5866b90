"""``fuse_model_with_report`` folds a DBB conv's bias into the BatchNorm that
consumes its output, found by following the data when the module names do
not tell; where no BN exclusively consumes it the conv keeps its bias and is
reported, and the fused model stays equivalent."""
from __future__ import annotations

import logging
import warnings
from typing import List

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import MMLogger

from numerics import _one_thread  # noqa: F401 - autouse fixture: tiny tensors, one intra-op thread
from orepa_mm import FuseReport, fuse_model, fuse_model_with_report
from orepa_mm.layers import DBBConv2d, OREPAConv2d

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


@torch.no_grad()
def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g))
    model.eval()


def _dbb(cin: int = 4, cout: int = 6) -> DBBConv2d:
    return DBBConv2d(cin, cout, 3, padding=1, bias=False)


def _check(model: nn.Module, biased: List[str], **kwargs) -> FuseReport:
    """Fuse; the report lists exactly ``biased`` and the outputs are unchanged."""
    _randomise(model)
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad():
        expected = model(x)
    report = fuse_model_with_report(model, **kwargs)
    assert report.biased_convs == biased
    with torch.no_grad():
        got = report.model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    for name, m in report.model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert (m.bias is not None) == (name in biased), f'{name}: bias {m.bias is not None}'
    return report


class _Parallel(nn.Module):
    """Res2Net's layout: convs and BNs in parallel ModuleLists."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_dbb(), _dbb(6, 4)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(6), nn.BatchNorm2d(4)])

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return x


class _Consumers(nn.Module):
    """One conv whose output also feeds a residual sum, one with no BN, one
    shared conv whose two calls go to two BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = _dbb(4, 4)
        self.norm_a = nn.BatchNorm2d(4)
        self.plain = _dbb(4, 4)
        self.shared = _dbb(4, 4)
        self.norm_b = nn.BatchNorm2d(4)
        self.norm_c = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.branch(x)
        y = self.norm_a(y) + y
        y = torch.relu(self.plain(y))
        return self.norm_b(self.shared(y)) + self.norm_c(self.shared(x))


class _Concat(nn.Module):
    """CGNet's layout: two convs concatenated along channels, then one BN."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = _dbb(4, 4)
        self.sur = DBBConv2d(4, 6, 3, padding=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x):
        return self.bn(torch.cat([self.loc(x), self.sur(x)], dim=1))


class _Detector(nn.Module):
    """An mmdet-style model: the trace runs ``extract_feat``, not ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Parallel()

    def extract_feat(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.extract_feat(x)


def test_bn_found_by_data_flow_when_names_do_not_tell() -> None:
    _check(_Parallel(), [])


def test_other_consumers_no_bn_and_shared_convs_keep_the_bias() -> None:
    _check(_Consumers(), ['branch', 'plain', 'shared'])


def test_concatenation_folds_into_the_bn_slice() -> None:
    _check(_Concat(), [])


def test_extract_feat_is_traced_and_example_input_used() -> None:
    report = _check(_Detector(), [], example_input=torch.zeros(1, 4, 8, 8))
    assert fuse_model(report.model) is not None  # idempotent on the fused model


def test_name_lookup_does_not_run_the_model() -> None:
    class _NoForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = ConvModule(4, 6, 3, padding=1, conv_cfg=dict(type='DBB'), norm_cfg=dict(type='BN'))

        def forward(self, x):
            return self.block(x)

    model = _NoForward()
    _randomise(model)
    model.forward = None  # any trace would fail
    report = fuse_model_with_report(model)
    assert report.biased_convs == [] and report.model.block.conv.bias is None


def test_failed_trace_warns_and_keeps_the_bias() -> None:
    class _TwoInputs(_Parallel):
        def forward(self, x, y):
            return super().forward(x + y)

    model = _TwoInputs()
    _randomise(model)
    with pytest.warns(UserWarning, match='tracing the data flow'):
        report = fuse_model_with_report(model)
    assert report.biased_convs == ['convs.0', 'convs.1']
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(report.model(x, x), model(x, x), atol=1e-5)


def test_single_layer_report() -> None:
    layer = _dbb()
    _randomise(layer)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        report = fuse_model_with_report(layer)
    assert isinstance(report.model, nn.Conv2d) and report.biased_convs == ['']


# -- modules reached under several names ----------------------------------------------
def _pair_of_names(conv: nn.Module, norm: nn.Module = None) -> nn.Module:
    """A module that reaches ``conv`` (and ``norm``) as ``a`` and as ``b``."""
    model = nn.Module()
    model.a = conv if norm is None else nn.Sequential(conv, norm)
    model.b = conv if norm is None else nn.Sequential(conv, norm)
    model.forward = lambda x: model.a(x) + 2 * model.b(x)
    return model


@pytest.mark.parametrize('layer', [OREPAConv2d(4, 4, 3, padding=1), _dbb(4, 4)], ids=['OREPA', 'DBB'])
def test_a_layer_reached_under_two_names_is_fused_once(layer: nn.Module) -> None:
    fused = fuse_model(_pair_of_names(layer))
    assert type(fused.a) is nn.Conv2d and fused.a is fused.b
    assert sum(p.numel() for p in fused.parameters()) == fused.a.weight.numel() + fused.a.bias.numel()


def test_a_shared_conv_and_bn_pair_folds_the_bias_once() -> None:
    conv, norm = _dbb(4, 4).double(), nn.BatchNorm2d(4).double()
    model = _pair_of_names(conv, norm)
    _randomise(model)
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    mean_before = norm.running_mean.clone()
    bias = conv.fuse().bias.detach()
    with torch.no_grad():
        expected = model(x)
    fused = fuse_model(model)
    assert fused.a[0] is fused.b[0] and fused.a[0].bias is None and fused.a[1] is fused.b[1]
    assert torch.allclose(fused.a[1].running_mean, mean_before - bias, rtol=0, atol=1e-12)
    fused.forward = lambda x: fused.a(x) + 2 * fused.b(x)
    with torch.no_grad():
        got = fused(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-10


def test_a_bn_fed_by_two_convs_absorbs_neither_bias() -> None:
    norm = nn.BatchNorm2d(4)
    model = nn.Module()
    model.a, model.b = nn.Sequential(_dbb(4, 4), norm), nn.Sequential(_dbb(4, 4), norm)
    model.forward = lambda x: model.a(x) - model.b(x)
    _randomise(model)
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad():
        expected = model(x)
    report = fuse_model_with_report(model)
    assert report.biased_convs == ['a.0', 'b.0']
    report.model.forward = lambda x: report.model.a(x) - report.model.b(x)
    with torch.no_grad():
        got = report.model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_fuse_model_logs_the_convs_left_with_a_bias() -> None:
    logger = MMLogger.get_current_instance()
    records: List[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        fuse_model(_Consumers())
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and 'keep a bias' in messages[0], messages
    assert all(name in messages[0] for name in ('branch', 'plain', 'shared'))
