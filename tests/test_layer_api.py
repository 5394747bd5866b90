"""What users of the layers rely on beyond the numbers: plain checkpoints load
function-preservingly, the eval-mode kernel cache, autocast, copies and
pickling, and argument checks.
"""
from __future__ import annotations

import copy
import pickle
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from numerics import (  # noqa: F401  (_one_thread, _seed: autouse fixtures)
    LAYER_CLASSES,
    _one_thread,
    _seed,
    assert_rel_close,
    conv_with_generated_kernel,
    randomize_,
    rel_err,
    settle_bn_,
)
from orepa_mm.layers import (
    LARGE_KERNEL_THRESHOLD,
    OREPA1x1Branches,
    OREPAConv2d,
    OREPAKxKBranches,
    OREPAStackedBranches,
    branch_kind,
    build_branches,
)

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


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


# -- 4b. the kernel-size rule ------------------------------------------------------
def test_branch_kind_is_the_rule_the_layer_follows() -> None:
    assert LARGE_KERNEL_THRESHOLD == 7
    expected = {1: '1x1', 3: 'kxk', 5: 'kxk', 7: 'stacked', 9: 'stacked'}
    classes = {'1x1': OREPA1x1Branches, 'kxk': OREPAKxKBranches, 'stacked': OREPAStackedBranches}
    for k, kind in expected.items():
        assert branch_kind(k) == kind, k
        assert type(build_branches(4, 6, k, 2)) is classes[kind], k
        assert type(OREPAConv2d(4, 6, k, padding=k // 2, groups=2).branches) is classes[kind], k
    # the threshold moves the boundary, in the function and in the layer alike
    assert branch_kind(7, large_kernel_threshold=9) == 'kxk' and branch_kind(5, large_kernel_threshold=5) == 'stacked'
    assert type(OREPAConv2d(4, 6, 7, padding=3, large_kernel_threshold=9).branches) is OREPAKxKBranches
    for bad in (0, 2, 4, -1, 3.0, True):
        with pytest.raises(ValueError, match='kernel_size'):
            branch_kind(bad)


@pytest.mark.parametrize('k', (1, 3, 7))
def test_plain_state_makes_the_block_compute_the_plain_kernel(k: int) -> None:
    generator = randomize_(build_branches(4, 6, k, 2))
    weight = torch.randn(6, 2, k, k)
    state = generator.plain_state(weight)
    assert set(state) == {'weight_origin', 'branch_scales'}
    generator.load_state_dict(dict(generator.state_dict(), **state))
    with torch.no_grad():
        assert_rel_close(generator(), weight, 1e-6, f'k={k}')
    with pytest.raises(ValueError, match='does not fit'):
        generator.plain_state(torch.randn(6, 2, k + 2, k + 2))


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


def test_eval_cache_refreshes_after_data_writes() -> None:
    """Writes through ``p.data`` (mmengine's EMA parameter swap) move no version
    counter; the cache compares values, so no ``eval()`` is needed after them
    (test_kernel_cache.py has every kind of write)."""
    layer = randomize_(OREPAConv2d(4, 6, 3, 1, 1)).eval()
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        layer(x)
        layer.branches.weight_origin.data.mul_(2)
        assert_rel_close(layer(x), fresh_output(layer, x), 1e-6, 'after p.data.mul_')


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
            assert torch.equal(layer._cache.kernel, ref)


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


