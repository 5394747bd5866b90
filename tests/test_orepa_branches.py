"""The OREPA blocks against an independent per-branch implementation written
here from the method's formulas (``docs/method.md``): every branch runs on the
feature map, as offline re-parameterization would, and the sum must equal the
single conv with the squeezed kernel, outputs and gradients alike; and the
generators' hand-written fast path against their autograd reference.
"""
from __future__ import annotations

import copy
from typing import Callable, Tuple

import pytest
import torch
import torch.nn.functional as F
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
    rel_err,
)
from orepa_mm.layers import OREPAConv2d
from orepa_mm.layers.orepa import OREPA1x1Branches, OREPAKxKBranches, OREPAStackedBranches

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


# -- 2. the squeezed kernel equals the branches run on the feature map --------
def kxk_branches_reference(x: Tensor, br: OREPAKxKBranches, stride: int, groups: int) -> Tensor:
    """The six OREPA branches, each run on the feature map ('same' padding)."""
    k, cin = br.kernel_size, x.shape[1]
    p = k // 2
    out = br.weight_origin.shape[0]
    v = br.branch_scales
    assert br.weight_1x1_kxk_first.shape[0] == cin, 'internal width of the 1x1-kxk branch must be in_channels'
    assert br.weight_dw.shape[0] == 8 * cin, 'the depthwise branch expands 8x'
    branches = [
        F.conv2d(x, br.weight_origin, None, stride, p, 1, groups),
        F.avg_pool2d(conv1x1(x, br.weight_avg, groups=groups), k, stride, p, count_include_pad=True),
        F.conv2d(conv1x1(x, br.weight_prior, groups=groups), prior_basis(out, k, x.dtype)[:, None], None,
                 stride, p, 1, out),
        F.conv2d(conv1x1(x, br.weight_1x1_kxk_first + block_identity(cin, groups, x.dtype), groups=groups),
                 br.weight_1x1_kxk_second, None, stride, p, 1, groups),
        conv1x1(x, br.weight_1x1, stride, groups=groups),
        conv1x1(F.conv2d(x, br.weight_dw, None, stride, p, 1, cin), br.weight_pw, groups=groups),
    ]
    return sum(per_channel(y, v[i]) for i, y in enumerate(branches))


def one_by_one_reference(x: Tensor, br: OREPA1x1Branches, stride: int, groups: int) -> Tensor:
    """The 1x1 block: origin 1x1 conv plus the pair of 1x1 convs, run in sequence."""
    v = br.branch_scales
    origin = conv1x1(x, br.weight_origin, stride, groups=groups)
    pair = conv1x1(conv1x1(x, br.weight_l2i_first, stride, groups=groups), br.weight_l2i_second, groups=groups)
    return per_channel(origin, v[0]) + per_channel(pair, v[1])


def stacked_reference(x: Tensor, br: OREPAStackedBranches, dilation: int, pad_each: int) -> Tensor:
    """The stacked 3x3 kernels applied one after the other on the feature map,
    plus the origin k x k conv (padding ``len(stack) * pad_each``)."""
    y = x
    for block in br.stack:
        y = F.conv2d(y, block(), None, 1, pad_each, dilation, br.groups)
    origin = F.conv2d(x, br.weight_origin, None, 1, len(br.stack) * pad_each, dilation, br.groups)
    return per_channel(origin, br.branch_scales[0]) + per_channel(y, br.branch_scales[1])


def check_against_reference(layer: OREPAConv2d, x: Tensor, reference: Callable[[Tensor], Tensor],
                            crop: int = 0, tol: float = TOL[torch.float64]) -> None:
    """Outputs and gradients (every parameter, the input) of the training-mode
    layer equal those of ``reference`` plus the layer's bias.  With ``crop``,
    only the interior of the output is compared (and no gradients)."""
    layer.train()
    x = x.detach().requires_grad_()
    out = layer(x)
    ref = reference(x)
    if layer.bias is not None:
        ref = ref + layer.bias.view(1, -1, 1, 1)
    if crop:
        inner = (..., slice(crop, -crop), slice(crop, -crop))
        assert_rel_close(out[inner], ref[inner], tol, 'output (interior)')
        assert rel_err(out, ref) > 1e-3, 'the border should differ: the stack cuts its intermediate maps'
        return
    assert_rel_close(out, ref, tol, 'output')
    names, params = zip(*layer.named_parameters())
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (*params, x), grad_out)
    want = torch.autograd.grad(ref, (*params, x), grad_out, allow_unused=True)
    for name, g, w in zip((*names, 'input'), got, want):
        w = torch.zeros_like(g) if w is None else w
        assert_rel_close(g, w, tol * 100, f'grad of {name}')


@pytest.mark.parametrize('groups', (1, 2))
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('k', (3, 5))
def test_kxk_block_equals_its_branches(k: int, stride: int, groups: int) -> None:
    layer = randomize_(OREPAConv2d(4, 6, k, stride, k // 2, groups=groups)).double()
    assert isinstance(layer.branches, OREPAKxKBranches)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    check_against_reference(layer, x, lambda t: kxk_branches_reference(t, layer.branches, stride, groups))


@pytest.mark.parametrize('groups', (1, 2))
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('channels', ((4, 6), (6, 4)))
def test_1x1_block_equals_its_branches(channels: Tuple[int, int], stride: int, groups: int) -> None:
    cin, cout = channels
    layer = randomize_(OREPAConv2d(cin, cout, 1, stride, groups=groups)).double()
    assert isinstance(layer.branches, OREPA1x1Branches)
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    check_against_reference(layer, x, lambda t: one_by_one_reference(t, layer.branches, stride, groups))


@pytest.mark.parametrize('dilation', (1, 2))
@pytest.mark.parametrize('groups', (1, 2))
def test_stacked_kernel_is_the_kernel_of_the_stack(groups: int, dilation: int) -> None:
    """The 7x7 kernel is the TRUE kernel of three stacked 3x3 convs."""
    def build(padding: int) -> OREPAConv2d:
        torch.manual_seed(1)
        layer = randomize_(OREPAConv2d(4, 6, 7, 1, padding, dilation, groups)).double()
        with torch.no_grad():
            layer.branches.branch_scales[0].zero_()  # only the stack contributes
        return layer

    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    layer = build(3 * dilation)
    assert isinstance(layer.branches, OREPAStackedBranches) and len(layer.branches.stack) == 3
    # 'Same' padding at every step: equal away from the border, where the
    # stack's intermediate maps are cut and zero-padded.
    check_against_reference(layer, x, lambda t: stacked_reference(t, layer.branches, dilation, dilation),
                            crop=2 * dilation)
    # 'Full' padding at every step cuts nothing: equal everywhere, gradients too.
    layer = build(6 * dilation)
    check_against_reference(layer, x, lambda t: stacked_reference(t, layer.branches, dilation, 2 * dilation))


# -- 3. the training path: kernels from batched generation (one autograd node per group) --
GRAD_CASES = {
    'all': ((), True),
    'frozen_scales_and_origin': (('branch_scales', 'weight_origin'), True),
    'input_without_grad': ((), False),
    'frozen_some_input_without_grad': (('weight_avg', 'l2i_first', 'stack.0.', 'bias'), False),
    'only_bias_trainable': (('branches.', ), True),
}


@pytest.mark.parametrize('case', GRAD_CASES)
@pytest.mark.parametrize('k,padding_mode', ((1, 'zeros'), (3, 'zeros'), (3, 'circular'), (7, 'zeros')))
def test_online_kernel_gradients_match_autograd(k: int, padding_mode: str, case: str) -> None:
    frozen, input_grad = GRAD_CASES[case]
    padding = 2 * (k // 2) if k > 1 else 1
    layer = randomize_(OREPAConv2d(4, 6, k, 2, padding, 2, 2, padding_mode=padding_mode)).double().train()
    for name, p in layer.named_parameters():
        p.requires_grad_(not any(f in name for f in frozen))
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)

    out = layer(x1)
    ref = conv_with_generated_kernel(twin, x2)
    assert_rel_close(out, ref, TOL[torch.float64], 'output')
    branch_grads = any(p.requires_grad for p in layer.branches.parameters())
    assert any('GroupGenerate' in n for n in graph_names(out)) == branch_grads, graph_names(out)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        if not p.requires_grad:
            assert p.grad is None, f'frozen {name} got a gradient'
            continue
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert_rel_close(p.grad, q.grad, 1e-10, f'grad of {name}')
    if input_grad:
        assert_rel_close(x1.grad, x2.grad, 1e-10, 'grad of the input')
    else:
        assert x1.grad is None


def test_online_kernel_twice_backward_accumulates() -> None:
    """Two forwards through the Function, one backward: gradients accumulate like autograd's."""
    layer = randomize_(OREPAConv2d(4, 6, 3, 1, 1)).double().train()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    (layer(x).square().sum() + layer(x * 2).sum()).backward()
    (conv_with_generated_kernel(twin, x).square().sum() + conv_with_generated_kernel(twin, x * 2).sum()).backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-10, name)


# -- 3b. the generators' analytic fast path ---------------------------------------
# (in, out, k, groups): 1x1 and k x k blocks, grouped, depthwise, and groups > 4
# (the 1x1-kxk internal width is then 2 * in).
FAST_PATH_CASES = ((4, 6, 1, 1), (6, 4, 1, 2), (4, 6, 3, 1), (4, 6, 3, 2), (6, 6, 5, 3), (8, 8, 3, 8),
                   (10, 10, 3, 5), (4, 8, 3, 4))


@pytest.mark.parametrize('cin,cout,k,groups', FAST_PATH_CASES)
def test_generator_fast_path_matches_reference(cin: int, cout: int, k: int, groups: int) -> None:
    """``generate``/``kernel_backward`` (hand-written, buffer-reusing) equal the
    autograd formula ``reference_kernel`` and its gradients, and pass gradcheck."""
    layer = randomize_(OREPAConv2d(cin, cout, k, 1, k // 2, groups=groups)).double()
    br = layer.branches
    with torch.no_grad():
        for p in br.parameters():  # every factor random, including the identity-initialised ones
            p.add_(torch.randn_like(p) * 0.3)
    names, params = zip(*br.named_parameters())
    ref = br.reference_kernel()
    assert_rel_close(br.generate(), ref, TOL[torch.float64], 'generated kernel')
    grad = torch.randn_like(ref)
    want = dict(zip(names, torch.autograd.grad(ref, params, grad)))
    got = br.kernel_backward(grad)
    assert set(got) == set(names)
    for name in names:
        assert_rel_close(got[name], want[name], TOL[torch.float64], f'grad of {name}')
    leaves = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(br, dict(zip(names, ps)), ()), leaves, eps=1e-6, atol=1e-7)


def test_generated_kernels_and_grads_outlive_the_scratch_buffers() -> None:
    """Results handed out (kernels, parameter gradients) never live in the
    reused buffers: generating and differentiating other layers leaves them intact."""
    a = randomize_(OREPAConv2d(8, 8, 3, 1, 1))
    b = randomize_(OREPAConv2d(8, 8, 3, 1, 1, groups=8))
    c = randomize_(OREPAConv2d(8, 8, 1))
    kernel = a.branches.generate()
    grads = a.branches.kernel_backward(torch.randn_like(kernel))
    saved = kernel.clone(), {n: g.clone() for n, g in grads.items()}
    for layer in (b, c, a):
        k2 = layer.branches.generate()
        layer.branches.kernel_backward(torch.randn_like(k2))
        layer.branches.generate()
    assert torch.equal(kernel, saved[0])
    for name, g in grads.items():
        assert torch.equal(g, saved[1][name]), name


