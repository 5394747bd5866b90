"""The layers' constant buffers follow the parameters' dtype and device: at
construction (default dtype, ``dtype=`` / ``device=`` arguments) and after
``.to()`` / ``.double()`` / ``.half()``; the layers then train and fuse in
that dtype.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from numerics import (  # noqa: F401  (_one_thread, _seed: autouse fixtures)
    LAYER_CLASSES,
    _one_thread,
    _seed,
    assert_rel_close,
    needs_cpu_float16,
    prior_basis,
    randomize_,
    rel_err,
    settle_bn_,
)
from orepa_mm.fuse import fuse_model
from orepa_mm.layers import DBBConv2d, ReparamConv2d

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core

#: Relative tolerance of fused vs unfused (and of either vs the float64 result)
#: per dtype: a few roundings of the dtype's epsilon (float16 2^-11,
#: bfloat16 2^-8) accumulated over the branches and the input channels.
FUSE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
KERNEL_SIZES = (1, 3, 7)


@pytest.fixture
def default_dtype() -> Iterator[Callable[[torch.dtype], None]]:
    """Set the default dtype for one test; the previous one is restored even if it fails."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


# -- what the constants must hold ---------------------------------------------------
def layer_constants(layer: ReparamConv2d) -> List[Tuple[str, Tensor, Optional[Tensor]]]:
    """(name, buffer, value from the formula in float64 or None) of each constant buffer."""
    out, k = layer.out_channels, layer.kernel_size[0]
    box = torch.full((k, k), 1.0 / k ** 2, dtype=torch.float64)
    if isinstance(layer, DBBConv2d):
        return [(name, buf, box.expand(out, 1, k, k) if name.endswith('avg_window') else None)
                for name, buf in layer.named_buffers() if 'avg_window' in name or 'identity' in name]
    found = []
    for name, module in layer.named_modules():
        patterns = getattr(module, 'spatial_patterns', None)
        if patterns is not None:
            o, kk = module.out_channels, module.kernel_size
            patterns = patterns.view(o, 3, kk, kk)
            box = torch.full((kk, kk), 1.0 / kk ** 2, dtype=torch.float64)
            found += [(f'{name}.box', patterns[:, 0], box.expand(o, kk, kk)),
                      (f'{name}.prior', patterns[:, 1], prior_basis(o, kk, torch.float64)),
                      (f'{name}.identity_1x1_kxk', module.identity_1x1_kxk, None)]
    return found


def check_constants(layer: ReparamConv2d, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Every parameter and buffer is in ``dtype`` on ``device``; constants with
    a formula hold it to the precision of ``dtype`` (a float32 value cast to
    float64 would be off by 1e-8)."""
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == dtype, f'{what}: {name} is {t.dtype}, expected {dtype}'
        assert t.device == device, f'{what}: {name} is on {t.device}, expected {device}'
    constants = layer_constants(layer)
    if layer.kernel_size[0] > 1 or isinstance(layer, DBBConv2d):
        assert constants, f'{what}: no constant buffers found'
    if device.type == 'meta':
        return
    for name, buf, exact in constants:
        if exact is not None:
            assert_rel_close(buf, exact, 8 * torch.finfo(dtype).eps, f'{what}: {name}')
        else:  # an identity: zeros and ones only, one 1 per row
            assert set(buf.unique().tolist()) <= {0.0, 1.0} and torch.equal(
                buf.flatten(1).sum(1), torch.ones(buf.shape[0], dtype=dtype)), f'{what}: {name}'


def build(cls: type, k: int, **kwargs) -> ReparamConv2d:
    return cls(4, 6, k, 1, k // 2, groups=2, bias=True, **kwargs)


# -- construction in a dtype or on a device ------------------------------------
@pytest.mark.parametrize('k', KERNEL_SIZES)
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_built_under_float64_default_dtype(cls: type, k: int, default_dtype) -> None:
    default_dtype(torch.float64)
    layer = build(cls, k)
    check_constants(layer, torch.float64, torch.device('cpu'), f'{cls.__name__} k={k} default float64')
    check_trains_and_fuses(layer, torch.float64)


@pytest.mark.parametrize('dtype', (torch.float64, pytest.param(torch.float16, marks=needs_cpu_float16),
                                   torch.bfloat16), ids=str)
@pytest.mark.parametrize('k', KERNEL_SIZES)
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_built_with_dtype_argument(cls: type, k: int, dtype: torch.dtype, device: torch.device) -> None:
    layer = build(cls, k, dtype=dtype)
    check_constants(layer, dtype, device, f'{cls.__name__} k={k} dtype={dtype}')
    check_trains_and_fuses(layer, dtype, device)


@pytest.mark.parametrize('k', KERNEL_SIZES)
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_built_on_meta_device_then_materialised(cls: type, k: int) -> None:
    """``device='meta'`` builds shapes only; ``to_empty`` then materialises the
    parameters, and the constants are computed again (not left as garbage)."""
    layer = build(cls, k, device='meta', dtype=torch.float64)
    check_constants(layer, torch.float64, torch.device('meta'), f'{cls.__name__} k={k} meta')
    layer.to_empty(device='cpu')
    check_constants(layer, torch.float64, torch.device('cpu'), f'{cls.__name__} k={k} to_empty')


# -- conversion after construction -----------------------------------------------
CONVERSIONS = {
    'double': (lambda m: m.double(), torch.float64),
    'half': (lambda m: m.half(), torch.float16),
    'bfloat16': (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    'double_then_float': (lambda m: m.double().float(), torch.float32),
}


@pytest.mark.parametrize('conversion', [pytest.param(c, marks=needs_cpu_float16) if dtype == torch.float16 else c
                                        for c, (_, dtype) in CONVERSIONS.items()])
@pytest.mark.parametrize('k', KERNEL_SIZES)
@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_converted_after_construction(cls: type, k: int, conversion: str, device: torch.device) -> None:
    convert, dtype = CONVERSIONS[conversion]
    layer = convert(build(cls, k))
    check_constants(layer, dtype, device, f'{cls.__name__} k={k} {conversion}')
    check_trains_and_fuses(layer, dtype, device)


@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_constants_are_exact_after_double(cls: type) -> None:
    """After ``.double()`` the box (1/k^2) and frequency-prior constants hold
    their float64 values, not float32 values cast up: otherwise a float64
    layer is not average pooling / the prior filter to float64 precision."""
    layer = cls(4, 6, 3, padding=1).double()
    constants = [(n, b, e) for n, b, e in layer_constants(layer) if e is not None]
    assert constants
    for name, buf, exact in constants:
        assert buf.dtype == torch.float64
        assert_rel_close(buf, exact, 1e-15, f'{cls.__name__} {name}')
        assert rel_err(exact, exact.float().double()) > 1e-9, 'the check must be able to fail'


# -- forward, backward and fuse in the layer's dtype ---------------------------------
def check_trains_and_fuses(layer: ReparamConv2d, dtype: torch.dtype,
                           device: torch.device = torch.device('cpu')) -> None:
    """A training step's forward and backward run in ``dtype`` (finite
    gradients of the parameters' dtype); in eval mode, with a BN after the
    layer holding non-trivial statistics, the unfused and the fused model
    agree with each other and with the same model computed in float64."""
    what = f'{type(layer).__name__} k={layer.kernel_size[0]} {dtype}'
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    layer.train()
    xg = x.to(dtype).requires_grad_()
    out = layer(xg)
    assert out.dtype == dtype, what
    (out.float() * torch.randn(out.shape)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, f'{what}: grad of {name}'
        assert torch.isfinite(p.grad).all(), f'{what}: grad of {name}'
    assert xg.grad is not None and xg.grad.dtype == dtype, what

    # eval: the model in float64 is the reference; the same values in dtype, unfused and fused
    layer64 = randomize_(copy.deepcopy(layer).double())
    branches = getattr(layer64, 'branches', None)
    if branches is not None:  # OREPA: a kernel of max 1 keeps the squared outputs (BN variances) in float16's range
        with torch.no_grad():
            branches.branch_scales.div_(branches().abs().max())
    reference = settle_bn_(nn.Sequential(layer64, nn.BatchNorm2d(layer.out_channels, dtype=torch.float64)), 4, (9, 8))
    model = copy.deepcopy(reference).to(dtype)
    check_constants(model[0], dtype, device, f'{what} (after .to)')
    with torch.no_grad():
        ref = reference(x)
        unfused = model(x.to(dtype))
        fused_model = fuse_model(model)
        assert type(fused_model[0]) is nn.Conv2d and fused_model[0].weight.dtype == dtype, what
        fused = fused_model(x.to(dtype))
    tol = FUSE_TOL[dtype]
    assert unfused.dtype == fused.dtype == dtype, what
    assert_rel_close(fused, unfused, tol, f'{what}: fused vs unfused')
    assert_rel_close(unfused, ref, tol, f'{what}: unfused vs float64')
    assert_rel_close(fused, ref, tol, f'{what}: fused vs float64')
