"""Tests of the re-parameterizable conv layers (``OREPAConv2d``, ``DBBConv2d``),
``fuse_model`` and the kernel algebra of ``orepa_mm.kernels``.

Numerical equivalence is always measured relative to the output's own
magnitude, ``max|a - b| / max|a|``, in eval mode and with non-trivial
BatchNorm statistics (a BN follows the layer; train-mode forwards move its
running statistics, then its affine parameters are randomised).  The OREPA
blocks are also checked against an independent per-branch implementation
written here from the formulas of ``PAPER.md``: every branch runs on the
feature map, as in offline re-parameterization, and the sum must equal the
single conv with the squeezed kernel, outputs and gradients alike.
"""
from __future__ import annotations

import copy
import itertools
import math
import pickle
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from orepa_mm import kernels as K
from orepa_mm.fuse import fuse_model
from orepa_mm.layers import DBBConv2d, OREPAConv2d, ReparamConv2d
from orepa_mm.layers.orepa import OREPA1x1Branches, OREPAKxKBranches, OREPAStackedBranches

LAYER_CLASSES = (OREPAConv2d, DBBConv2d)
#: Relative tolerance of an exact identity evaluated in each dtype.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
#: (in_channels, out_channels, groups) of the fuse sweep; the last is depthwise.
CHANNELS = ((4, 8, 1), (4, 8, 2), (8, 4, 4), (6, 6, 6))
SIZES = ((11, 7), (13, 10))


@pytest.fixture(autouse=True, scope='module')
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- helpers ------------------------------------------------------------------
def rel_err(expected: Tensor, actual: Tensor) -> float:
    """``max|expected - actual| / max|expected|`` (0 when both are all zero)."""
    expected, actual = expected.detach().double(), actual.detach().double()
    diff = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str = '') -> None:
    assert actual.shape == expected.shape, f'{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    err = rel_err(expected, actual)
    assert err <= tol, f'{what}: relative error {err:.3e} > {tol:.0e}'


def random_sign(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return torch.randint(0, 2, tuple(shape)).to(dtype) * 2 - 1


@torch.no_grad()
def randomize_(layer: nn.Module) -> nn.Module:
    """Make every branch contribute: non-zero random branch scales (OREPA's
    prior branch starts at 0), perturbed zero- or identity-initialised
    factors, random biases."""
    for name, p in layer.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        if leaf == 'branch_scales':
            p.copy_(random_sign(p.shape, p.dtype) * torch.empty_like(p).uniform_(0.5, 1.5))
        elif leaf == 'bias' or leaf.endswith(('_first', '_second')):
            p.add_(torch.randn_like(p) * 0.5)
    return layer


@torch.no_grad()
def settle_bn_(model: nn.Module, in_channels: int, size: Tuple[int, int], batches: int = 2) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial running statistics
    (train-mode forwards, cumulative averaging) and a random affine
    transform; return ``model`` in eval mode."""
    dtype = next(model.parameters()).dtype
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    for _ in range(batches):
        model(torch.randn(2, in_channels, *size, dtype=dtype) * 1.5 + 0.3)
    for bn in norms:
        bn.weight.copy_(random_sign(bn.weight.shape, dtype) * torch.empty_like(bn.weight).uniform_(0.5, 1.5))
        bn.bias.normal_()
    return model.eval()


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def conv1x1(x: Tensor, matrix: Tensor, stride: int = 1, padding: int = 0, groups: int = 1) -> Tensor:
    """A grouped 1x1 conv whose kernel is given as a matrix ``(out, in // groups)``."""
    return F.conv2d(x, matrix[:, :, None, None], None, stride, padding, 1, groups)


def per_channel(y: Tensor, scale: Tensor) -> Tensor:
    return y * scale.view(1, -1, 1, 1)


def graph_names(t: Tensor) -> List[str]:
    """Names of the autograd nodes that produced ``t``."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def conv_with_generated_kernel(layer: OREPAConv2d, x: Tensor) -> Tensor:
    """The layer's computation written with plain autograd: ``conv2d`` with
    the kernel generated by ``layer.branches``."""
    padding = layer.padding
    if layer.padding_mode != 'zeros':
        ph, pw = padding
        x, padding = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode), 0
    return F.conv2d(x, layer.branches(), layer.bias, layer.stride, padding, layer.dilation, layer.groups)


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


# -- 2. the squeezed kernel equals the branches run on the feature map --------
def prior_basis(out_channels: int, k: int, dtype: torch.dtype) -> Tensor:
    """PAPER.md's frequency prior, element by element: ``(out, k, k)``."""
    basis = torch.empty(out_channels, k, k, dtype=torch.float64)
    for o, h, w in itertools.product(range(out_channels), range(k), range(k)):
        if o < out_channels / 2:
            basis[o, h, w] = math.cos(math.pi * (h + 0.5) * (o + 1) / k)
        else:
            basis[o, h, w] = math.cos(math.pi * (w + 0.5) * (o + 1 - out_channels / 2) / k)
    return basis.to(dtype)


def block_identity(channels: int, groups: int, dtype: torch.dtype) -> Tensor:
    """The identity map as a grouped 1x1 kernel ``(channels, channels // groups)``."""
    in_g = channels // groups
    idx = torch.arange(channels)
    return torch.eye(channels, dtype=dtype).view(channels, groups, in_g)[idx, idx // in_g]


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


# -- 3. the custom autograd Function ------------------------------------------
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
    assert any('OnlineKernel' in n for n in graph_names(out)) == branch_grads, graph_names(out)
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
    assert_rel_close(br.generate(scratch=True), ref, TOL[torch.float64], 'generated kernel (scratch)')
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
        k2 = layer.branches.generate(scratch=True)
        layer.branches.kernel_backward(torch.randn_like(k2))
        layer.branches.generate()
    assert torch.equal(kernel, saved[0])
    for name, g in grads.items():
        assert torch.equal(g, saved[1][name]), name


# -- 4. plain checkpoints -----------------------------------------------------------
def random_plain_conv(cin: int, cout: int, k: int, groups: int, bias: bool) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


@pytest.mark.parametrize('bias', (True, False))
@pytest.mark.parametrize('k', (1, 3, 7))
def test_plain_checkpoint_reproduces_plain_conv(k: int, bias: bool) -> None:
    for groups in (1, 2):
        conv = random_plain_conv(4, 6, k, groups, bias)
        layer = randomize_(OREPAConv2d(4, 6, k, 1, k // 2, groups=groups, bias=bias))
        state = conv.state_dict()
        keys = set(state)
        layer.load_state_dict(state, strict=True)
        assert set(state) == keys, 'load_state_dict changed the caller\'s dict'
        x = torch.randn(2, 4, 9, 8)
        ref = conv(x)
        layer.eval()
        with torch.no_grad():
            assert_rel_close(layer(x), ref, 1e-6, f'eval k={k} groups={groups}')
        layer.train()
        assert_rel_close(layer(x), ref, 1e-6, f'train k={k} groups={groups}')
        assert_rel_close(layer.weight, conv.weight, 1e-6, 'generated kernel')
        # nested in a model, with a prefix
        model = nn.Sequential(randomize_(OREPAConv2d(4, 6, k, 1, k // 2, groups=groups, bias=bias)))
        model.load_state_dict(nn.Sequential(conv).state_dict(), strict=True)
        with torch.no_grad():
            assert_rel_close(model.eval()(x), ref, 1e-6, f'nested k={k} groups={groups}')


@pytest.mark.parametrize('k', (1, 3, 7))
def test_plain_checkpoint_shape_mismatch_raises(k: int) -> None:
    layer = OREPAConv2d(4, 6, k, 1, k // 2)
    for wrong in (nn.Conv2d(4, 8, k, padding=k // 2), nn.Conv2d(4, 6, k + 2, padding=k // 2 + 1)):
        with pytest.raises(RuntimeError, match='size mismatch'):
            layer.load_state_dict(wrong.state_dict(), strict=True)


@pytest.mark.parametrize('k', (1, 3, 7))
def test_single_init_starts_as_the_origin_conv(k: int) -> None:
    layer = OREPAConv2d(4, 6, k, 1, k // 2, groups=2, single_init=True)
    origin = layer.branches.weight_origin
    assert_rel_close(layer.weight, origin.view(6, 2, k, k), 1e-6, 'single_init kernel')
    layer.reset_parameters()
    assert_rel_close(layer.weight, layer.branches.weight_origin.view(6, 2, k, k), 1e-6, 'after reset_parameters')


# -- 5. the eval-mode kernel cache -------------------------------------------------
def count_kernel_calls(layer: OREPAConv2d) -> List[int]:
    calls: List[int] = []
    layer.branches.register_forward_hook(lambda *_: calls.append(1))
    return calls


def fresh_output(layer: OREPAConv2d, x: Tensor) -> Tensor:
    """The layer's output computed from scratch (``forward`` of the generator
    is called directly, so the counting hook does not see it)."""
    with torch.no_grad():
        return F.conv2d(x, layer.branches.forward(), layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)


@pytest.mark.parametrize('k', (1, 3, 7))
def test_eval_cache_computes_kernel_once_and_invalidates(k: int) -> None:
    layer = randomize_(OREPAConv2d(4, 6, k, 1, k // 2)).eval()
    calls = count_kernel_calls(layer)
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert len(calls) == 1, 'eval/no_grad forwards must reuse the kernel'
    assert torch.equal(y1, y2)
    assert_rel_close(y1, fresh_output(layer, x), 1e-6, 'cached kernel')

    # load_state_dict invalidates
    other = randomize_(OREPAConv2d(4, 6, k, 1, k // 2)).eval()
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        y3 = layer(x)
        assert_rel_close(y3, other(x), 1e-6, 'after load_state_dict')
    assert len(calls) == 2
    assert rel_err(y1, y3) > 1e-2

    # an in-place update under no_grad invalidates
    with torch.no_grad():
        next(layer.branches.parameters()).mul_(1.5)
        assert_rel_close(layer(x), fresh_output(layer, x), 1e-6, 'after in-place update')

    # train()/eval() invalidate, even with unchanged parameters
    n = len(calls)
    layer.train()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert len(calls) == n + 1

    # an optimizer step invalidates (cache filled in train mode under no_grad, no mode switch)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    with torch.no_grad():
        before = layer(x)
    (layer(x) * torch.randn_like(before)).mean().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        assert rel_err(before, after) > 1e-4, 'the step did not change the output'
        assert_rel_close(after, fresh_output(layer, x), 1e-6, 'after optimizer step (train mode)')
        assert_rel_close(layer.eval()(x), fresh_output(layer, x), 1e-6, 'after optimizer step (eval)')


def test_eval_cache_refreshes_after_data_writes_and_eval() -> None:
    """Writes through ``p.data`` (mmengine's EMA parameter swap) bypass the
    version counters the cache keys on; ``eval()``, which the val/test loops
    call after such a swap, drops the cache."""
    layer = randomize_(OREPAConv2d(4, 6, 3, 1, 1)).eval()
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        layer(x)
        layer.branches.weight_origin.data.mul_(2)
        layer.eval()
        assert_rel_close(layer(x), fresh_output(layer, x), 1e-6, 'after p.data.mul_ and eval()')


def test_eval_cache_filled_in_inference_mode_serves_autograd() -> None:
    """A kernel cached under ``torch.inference_mode`` is an inference tensor;
    a later grad-mode forward of the (frozen) layer must still work."""
    layer = randomize_(OREPAConv2d(4, 6, 3, 1, 1)).eval()
    layer.branches.requires_grad_(False)  # e.g. a frozen backbone stage
    x = torch.randn(2, 4, 9, 8)
    with torch.inference_mode():
        layer(x)
    xg = x.clone().requires_grad_()
    out = layer(xg)
    out.sum().backward()
    assert_rel_close(layer.bias.grad, torch.full_like(layer.bias, out[:, 0].numel()), 1e-6, 'bias grad')
    ref = x.clone().requires_grad_()
    conv_with_generated_kernel(layer, ref).sum().backward()
    assert_rel_close(xg.grad, ref.grad, 1e-6, 'input grad')


def test_eval_cache_follows_dtype_conversion() -> None:
    layer = randomize_(OREPAConv2d(4, 6, 3, 1, 1)).eval()
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        layer(x)
        layer.double()
        y = layer(x.double())
    assert y.dtype == torch.float64
    assert_rel_close(y, fresh_output(layer, x.double()), 1e-12, 'after .double()')


# -- 6. autocast, copies, pickling ----------------------------------------------
@pytest.mark.parametrize('k', (1, 3, 7))
def test_bf16_autocast_training(k: int) -> None:
    layer = randomize_(OREPAConv2d(8, 8, k, 1, k // 2, groups=2)).train()
    x = torch.randn(2, 8, 12, 10)
    ref = layer(x).detach()
    xg = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(xg)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), ref, 2e-2, 'bf16 output')
    out.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert xg.grad is not None and xg.grad.dtype == torch.float32


@pytest.mark.parametrize('k', (1, 3, 7))
def test_kernel_is_generated_in_full_precision_under_autocast(k: int) -> None:
    """Like nn.Conv2d's weight, the generated kernel (``weight``, the eval
    cache) is float32 under autocast; only the conv runs in bf16."""
    layer = randomize_(OREPAConv2d(8, 8, k, 1, k // 2, groups=2))
    with torch.no_grad():
        ref = layer.weight
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(layer.weight, ref)
        with torch.no_grad():
            assert torch.equal(layer.eval().weight, ref)
            assert layer(torch.randn(2, 8, 9, 9)).dtype == torch.bfloat16
            assert torch.equal(layer._cache[1], ref)


@pytest.mark.parametrize('k', (1, 3, 7))
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_copy_pickle_and_state_dict_round_trip(cls: type, k: int) -> None:
    layer = randomize_(cls(4, 6, k, 1, k // 2, groups=2))
    layer = settle_bn_(nn.Sequential(layer), 4, (9, 8))[0]  # DBB: non-trivial branch BNs
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        ref = layer(x)  # fills OREPA's cache
        copies = {'deepcopy': copy.deepcopy(layer), 'pickle': pickle.loads(pickle.dumps(layer))}
        fresh = cls(4, 6, k, 1, k // 2, groups=2)
        fresh.load_state_dict(layer.state_dict(), strict=True)
        copies['state_dict'] = fresh.eval()
        for how, other in copies.items():
            assert torch.equal(other(x), ref), how
        # a copy is independent of the original
        for p in copies['deepcopy'].parameters():
            p.mul_(2)
        assert torch.equal(layer(x), ref)


# -- 7. argument checks ------------------------------------------------------------
BAD_ARGS = {
    'even_kernel_2': (dict(in_channels=4, out_channels=4, kernel_size=2), r'kernel_size.*2|2.*kernel_size'),
    'even_kernel_4': (dict(in_channels=4, out_channels=4, kernel_size=4), r'kernel_size.*4|4.*kernel_size'),
    'non_square_kernel': (dict(in_channels=4, out_channels=4, kernel_size=(3, 1)), r'square'),
    'padding_mode': (dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode='foo'), r"padding_mode.*'foo'"),
    'in_not_divisible': (dict(in_channels=6, out_channels=4, kernel_size=3, groups=4), r'divisible by groups'),
    'out_not_divisible': (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), r'divisible by groups'),
    'negative_padding': (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), r'padding.*(>= ?0|negat)'),
    'same_with_stride_2': (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding='same'),
                           r"same.*stride|stride.*same"),
    'unknown_padding_string': (dict(in_channels=4, out_channels=4, kernel_size=3, padding='foo'), r'padding'),
}


@pytest.mark.parametrize('case', BAD_ARGS)
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_bad_arguments_raise_value_error(cls: type, case: str) -> None:
    kwargs, pattern = BAD_ARGS[case]
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize('k,dilation', ((1, 1), (3, 1), (3, 2), (5, 3), (7, 1)))
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_same_padding_keeps_size(cls: type, k: int, dilation: int) -> None:
    layer = cls(4, 6, k, padding='same', dilation=dilation)
    assert layer.padding == (dilation * (k // 2),) * 2
    x = torch.randn(1, 4, 11, 7)
    assert layer(x).shape == (1, 6, 11, 7)
    with torch.no_grad():
        assert layer.eval()(x).shape == (1, 6, 11, 7)


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


# -- constants of the layers follow the module's dtype ---------------------------
def layer_constants(layer: ReparamConv2d) -> List[Tuple[str, Tensor, Optional[Tensor]]]:
    """(name, buffer, value from the formula in float64) of each non-trivial constant."""
    out, k = layer.out_channels, layer.kernel_size[0]
    box = torch.full((k, k), 1.0 / k ** 2, dtype=torch.float64)
    if isinstance(layer, DBBConv2d):
        return [('avg_window', layer.avg_window, box.expand(out, 1, k, k))]
    patterns = layer.branches.spatial_patterns.view(out, 3, k, k)
    return [('box', patterns[:, 0], box.expand(out, k, k)),
            ('prior', patterns[:, 1], prior_basis(out, k, torch.float64))]


@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_constants_are_exact_after_double(cls: type) -> None:
    """After ``.double()`` the box (1/k^2) and frequency-prior constants hold
    their float64 values, not float32 values cast up: otherwise a float64
    layer is not average pooling / the prior filter to float64 precision."""
    layer = cls(4, 6, 3, padding=1).double()
    for name, buf, exact in layer_constants(layer):
        assert buf.dtype == torch.float64
        assert_rel_close(buf, exact, 1e-15, f'{cls.__name__} {name}')
