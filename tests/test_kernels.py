"""The kernel algebra of ``orepa_mm.kernels``, each identity checked by running
the convs it stands for.
"""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from numerics import _one_thread, _seed, assert_rel_close, block_identity, conv1x1, prior_basis, rel_err  # noqa: F401  (_one_thread, _seed: autouse fixtures)
from orepa_mm import kernels as K
from orepa_mm.layers import OREPAConv2d

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


# -- 8. kernel algebra --------------------------------------------------------------
def dd(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize('affine,conv_bias', ((True, True), (True, False), (False, True)))
def test_fold_bn(affine: bool, conv_bias: bool) -> None:
    conv = nn.Conv2d(4, 6, 3, 2, 1, groups=2, bias=conv_bias).double()
    bn = nn.BatchNorm2d(6, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    x = dd(2, 4, 9, 8)
    kernel, bias = K.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    with torch.no_grad():
        assert_rel_close(F.conv2d(x, kernel, bias, 2, 1, 1, 2), bn(conv(x)), 1e-12, 'fold_bn')


def test_fold_bias_into_bn() -> None:
    bn = nn.BatchNorm2d(5).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    y, b = dd(2, 5, 4, 3), dd(5)
    with torch.no_grad():
        ref = bn(y + b.view(1, -1, 1, 1))
        bn.running_mean.copy_(K.fold_bias_into_bn(b, bn.running_mean))
        assert_rel_close(bn(y), ref, 1e-12, 'fold_bias_into_bn')


@pytest.mark.parametrize('k,stride,dilation', ((3, 1, 1), (5, 2, 1), (3, 1, 3), (7, 2, 2)))
def test_pad_to_kxk(k: int, stride: int, dilation: int) -> None:
    x = dd(2, 4, 13, 10)
    w = dd(6, 2, 1, 1)
    for padding in (dilation * (k // 2), dilation * (k // 2) + 1):
        ref = F.conv2d(x, w, None, stride, padding - dilation * (k // 2), 1, 2)
        for kernel in (w, w[:, :, 0, 0]):  # 4-D and matrix forms
            padded = K.pad_to_kxk(kernel, k)
            assert padded.shape == (6, 2, k, k)
            assert_rel_close(F.conv2d(x, padded, None, stride, padding, dilation, 2), ref, 1e-12, 'pad_to_kxk')
    # a centred 3x3 in 5x5
    w3 = dd(6, 2, 3, 3)
    assert_rel_close(F.conv2d(x, K.pad_to_kxk(w3, 5), None, 1, 2, 1, 2), F.conv2d(x, w3, None, 1, 1, 1, 2),
                     1e-12, '3x3 in 5x5')
    for bad in ((w, 4), (w3, 1), (dd(6, 2, 2, 2), 4)):
        with pytest.raises(ValueError):
            K.pad_to_kxk(*bad)


@pytest.mark.parametrize('groups', (1, 2, 6))
def test_conv_of_constant(groups: int) -> None:
    """A conv of a per-channel constant map, padded with that constant,
    outputs ``conv_of_constant`` everywhere (the bias a DBB BN-and-pad
    branch pushes through its k x k conv)."""
    kernel, value = dd(6, 6 // groups, 3, 3), dd(6)
    # 'same' padding with the constant itself: the padded map is constant too
    padded = value.view(1, 6, 1, 1).expand(2, 6, 9, 7)
    got = F.conv2d(padded, kernel, None, 2, 0, 1, groups)
    want = K.conv_of_constant(kernel, value, groups).view(1, 6, 1, 1).expand_as(got)
    assert_rel_close(got, want, 1e-12, 'conv_of_constant')
    with pytest.raises(ValueError, match='do not feed'):
        K.conv_of_constant(kernel, dd(5), groups)


@pytest.mark.parametrize('k', (1, 3, 5, 7))
def test_frequency_prior(k: int) -> None:
    for out in (1, 4, 5, 6):
        basis = K.frequency_prior(out, k, dtype=torch.float64)
        assert basis.shape == (out, k, k) and basis.dtype == torch.float64
        assert torch.isfinite(basis).all()
        assert_rel_close(basis, prior_basis(out, k, torch.float64), 1e-12, f'prior out={out} k={k}')
        assert torch.equal(K.frequency_prior(out, k, dtype=torch.float64), basis), 'not deterministic'
        assert_rel_close(K.frequency_prior(out, k), prior_basis(out, k, torch.float32), 1e-6, 'float32 prior')
    # the layer's buffer holds the basis (no uninitialised memory), for every k
    if k > 1:
        layer = OREPAConv2d(4, 6, k, padding=k // 2, large_kernel_threshold=k + 2)
        patterns = layer.branches.spatial_patterns
        assert torch.isfinite(patterns).all()
        assert any(torch.allclose(patterns[:, i].reshape(6, k, k), prior_basis(6, k, patterns.dtype))
                   for i in range(patterns.shape[1]))


@pytest.mark.parametrize('k', (1, 3, 5))
def test_box_kernel_is_average_pooling(k: int) -> None:
    x = dd(2, 3, 9, 8)
    box = K.box_kernel(k, dtype=torch.float64)
    got = F.conv2d(x, box.expand(3, 1, k, k), None, 2, k // 2, 1, 3)
    assert_rel_close(got, F.avg_pool2d(x, k, 2, k // 2, count_include_pad=True), 1e-12, 'box kernel')


@pytest.mark.parametrize('groups', (1, 2, 4))
def test_grouped_identity(groups: int) -> None:
    x = dd(2, 8, 5, 4)
    eye = K.grouped_identity(8, 8 // groups, dtype=torch.float64)
    assert torch.equal(conv1x1(x, eye, groups=groups), x)
    assert torch.equal(eye, block_identity(8, groups, torch.float64))
    # channels = 2 * in copies each input channel twice within its group
    twice = conv1x1(x, K.grouped_identity(16, 8 // groups, dtype=torch.float64), groups=groups)
    per_group = twice.view(2, groups, 2, 8 // groups, 5, 4)
    assert torch.equal(per_group[:, :, 0], x.view(2, groups, 8 // groups, 5, 4))
    assert torch.equal(per_group[:, :, 1], x.view(2, groups, 8 // groups, 5, 4))


@pytest.mark.parametrize('groups', (1, 2))
def test_compose_1x1_kxk_and_1x1_1x1(groups: int) -> None:
    x = dd(2, 4, 9, 8)
    first, second = dd(6, 4 // groups), dd(8, 6 // groups, 3, 3)
    ref = F.conv2d(conv1x1(x, first, groups=groups), second, None, 2, 1, 2, groups)
    for a in (first, first[:, :, None, None]):
        got = F.conv2d(x, K.compose_1x1_kxk(a, second, groups), None, 2, 1, 2, groups)
        assert_rel_close(got, ref, 1e-12, 'compose_1x1_kxk')
    ref = conv1x1(conv1x1(x, first, groups=groups), second[:, :, 1, 1], groups=groups)
    assert_rel_close(conv1x1(x, K.compose_1x1_1x1(first, second[:, :, 1, 1], groups), groups=groups), ref,
                     1e-12, 'compose_1x1_1x1')


@pytest.mark.parametrize('groups', (1, 2, 4))
@pytest.mark.parametrize('expand', (1, 3, 8))
def test_dw_pw_to_full(expand: int, groups: int) -> None:
    cin, cout, k = 4, 6 if groups < 4 else 8, 3
    x = dd(2, cin, 9, 8)
    dw, pw = dd(expand * cin, 1, k, k), dd(cout, expand * cin // groups)
    ref = conv1x1(F.conv2d(x, dw, None, 2, 1, 1, cin), pw, groups=groups)
    full = K.dw_pw_to_full(dw, pw, expand, groups)
    assert full.shape == (cout, cin // groups, k, k)
    assert_rel_close(F.conv2d(x, full, None, 2, 1, 1, groups), ref, 1e-12, 'dw_pw_to_full')
    with pytest.raises(ValueError):
        K.dw_pw_to_full(dw, dd(cout, expand * cin // groups + 1), expand, groups)


def run_stack(x: Tensor, kernels: Sequence[Tensor], groups: int, dilation: int = 1) -> Tensor:
    """Stride-1 convs in sequence, each with 'full' padding (nothing is cut)."""
    for w in kernels:
        x = F.conv2d(x, w, None, 1, dilation * (w.shape[-1] - 1), dilation, groups)
    return x


@pytest.mark.parametrize('groups', (1, 2))
def test_compose_kernels_and_stack(groups: int) -> None:
    x = dd(2, 4, 8, 7)
    a, b = dd(6, 4 // groups, 3, 3), dd(8, 6 // groups, 5, 5)
    composed = K.compose_kernels(a, b, groups)
    assert composed.shape == (8, 4 // groups, 7, 7)
    for dilation in (1, 2):
        assert_rel_close(F.conv2d(x, composed, None, 1, 6 * dilation, dilation, groups),
                         run_stack(x, (a, b), groups, dilation), 1e-12, 'compose_kernels')
    # the reference code's cross-correlation is NOT the kernel of the stack
    wrong = K.cross_correlate_kernels(a, b, groups)
    assert rel_err(run_stack(x, (a, b), groups), F.conv2d(x, wrong, None, 1, 6, 1, groups)) > 1e-3
    stack = [dd(6, 4 // groups, 3, 3), dd(6, 6 // groups, 3, 3), dd(8, 6 // groups, 1, 1), dd(8, 8 // groups, 3, 3)]
    composed = K.compose_stack(stack, groups)
    assert composed.shape == (8, 4 // groups, 7, 7)
    assert_rel_close(F.conv2d(x, composed, None, 1, 6, 1, groups), run_stack(x, stack, groups), 1e-12,
                     'compose_stack')
    # 'same' padding: equal in the interior
    same = x
    for w in stack:
        same = F.conv2d(same, w, None, 1, w.shape[-1] // 2, 1, groups)
    assert_rel_close(F.conv2d(x, composed, None, 1, 3, 1, groups)[..., 2:-2, 2:-2], same[..., 2:-2, 2:-2], 1e-12,
                     'compose_stack, same padding, interior')


def test_as_matrix_and_scale_out_channels() -> None:
    w = dd(6, 2, 1, 1)
    assert torch.equal(K.as_matrix(w), w[:, :, 0, 0])
    assert torch.equal(K.as_matrix(w[:, :, 0, 0]), w[:, :, 0, 0])
    with pytest.raises(ValueError):
        K.as_matrix(dd(6, 2, 3, 3))
    s = dd(6)
    for t in (dd(6, 2), dd(6, 2, 3, 3)):
        got = K.scale_out_channels(t, s)
        for o in range(6):
            assert torch.equal(got[o], t[o] * s[o])


