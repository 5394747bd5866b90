"""Shared numerics of the layer tests: relative errors, randomised branches,
BN statistics that are not the identity, and small reference convs."""
from __future__ import annotations

import itertools
import math
from typing import Iterator, List, Sequence, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from orepa_mm.layers import DBBConv2d, OREPAConv2d

LAYER_CLASSES = (OREPAConv2d, DBBConv2d)
#: Relative tolerance of an exact identity evaluated in each dtype.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
#: (in_channels, out_channels, groups) of the fuse sweep; the last is depthwise.
CHANNELS = ((4, 8, 1), (4, 8, 2), (8, 4, 4), (6, 6, 6))
SIZES = ((11, 7), (13, 10))


def _cpu_float16_kernels() -> bool:
    """Whether this torch has the float16 CPU kernels the layers use (torch
    2.1 has no float16 ``bmm`` or ``conv2d`` on the CPU; CUDA has them all)."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.float16)
        torch.bmm(a, a)
        F.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.float16), torch.ones(1, 1, 3, 3, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


#: Whether this torch computes float16 bmm/conv2d on the CPU.
CPU_FLOAT16 = _cpu_float16_kernels()
#: Marks a float16 case on the CPU: run where this torch can compute in float16 there.
needs_cpu_float16 = pytest.mark.skipif(not CPU_FLOAT16,
                                       reason=f'torch {torch.__version__} has no float16 bmm/conv2d on the CPU')




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


def prior_basis(out_channels: int, k: int, dtype: torch.dtype) -> Tensor:
    """The frequency prior as ``docs/method.md`` states it, element by element: ``(out, k, k)``."""
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
