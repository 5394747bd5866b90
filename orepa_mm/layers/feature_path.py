"""Branches computed on the feature map when that is cheaper than in the kernel.

Two OREPA branches are a product of two convs: the k x k block's ``1x1_kxk``
(a 1x1 conv ``A + I`` then a k x k conv ``v * C``) and the 1x1 block's
``l2i`` (a 1x1 conv ``A`` then a 1x1 conv ``v * B``).  Folding them into the
kernel costs a matrix product whose size does not depend on the input
(``out * k^2 * t * in`` multiply-adds for ``1x1_kxk``, with ``t = in``), so
at small batches it is the largest fixed cost of an OREPA training step.
Running the two convs on the feature map costs work proportional to the
input instead.  Both are exact: the two convs compose into the folded kernel
(no bias between them, and zero padding commutes with a 1x1 conv).

In a training step, a layer whose option is ``feature_path='auto'`` (the
default) computes such a branch on the feature map when, for that input
shape:

* it costs less there than in the kernel, counted in multiply-adds
  (forward; the backward of either form is about twice its forward, so the
  comparison holds for the step), with the operators it adds to the step
  priced in multiply-adds too (:data:`OPERATOR_COST_MACS`): the kernel's
  share of a group generation adds no operator, the feature map adds a
  dozen per layer, which decides for small layers; and
* the intermediate map it keeps for backward is no larger than the layer's
  kernel (so the choice never keeps more than a kernel's worth per layer).

The rest of the kernel is still generated together with the layers of the
same shape and choice (:mod:`.batched_generation`).  ``'always'`` and
``'never'`` force the choice (``'never'``: the paper's one conv per forward).
Evaluation, fusing and export always use the whole kernel: the choice only
changes how a training step computes the same function.
:func:`feature_path_report` lists each layer's last choice and its cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import compat
from .orepa_branches import OREPA1x1Branches, OREPAKxKBranches

__all__ = ['FEATURE_PATHS', 'FEATURE_PATH_OPERATORS', 'OPERATOR_COST_MACS', 'FeaturePlan', 'plan_for',
           'operator_cost_macs', 'feature_branch_conv', 'feature_path_report']

#: The values of ``OREPAConv2d(feature_path=...)``.
FEATURE_PATHS = ('auto', 'always', 'never')
#: The branch of each block type that can run on the feature map.
_FEATURE_BRANCH = {OREPAKxKBranches: '1x1_kxk', OREPA1x1Branches: 'l2i'}
#: Operators a training step gains per layer when the branch runs on the
#: feature map (forward and backward; counted with the benchmark's operator
#: counter, held by ``tests/test_feature_path.py``).
FEATURE_PATH_OPERATORS = {'1x1_kxk': 13, 'l2i': 10}
#: What one more operator costs, in multiply-adds of the same time, by
#: device type: on a CPU about 10 us of dispatch and memory traffic at some
#: 100 GMAC/s; on an accelerator (default) a few us of launch at some
#: 100 TMAC/s, so that there only large savings move a branch.  The CPU
#: figure is measured on this project's machine; the accelerator one is an
#: estimate until a GPU run measures it.
OPERATOR_COST_MACS = {'cpu': 1_000_000}
ACCELERATOR_OPERATOR_COST_MACS = 500_000_000


@dataclass(frozen=True)
class FeaturePlan:
    """One layer's choice for one input shape, with what it weighed."""

    branch: str  #: the branch that can run on the feature map
    input_shape: Tuple[int, ...]  #: the (padded) input of the layer's conv
    kernel_macs: int  #: multiply-adds to fold the branch into the kernel (forward)
    feature_macs: int  #: multiply-adds to run it on the feature map (forward)
    overhead_macs: int  #: the operators it adds on the feature map, priced in multiply-adds
    feature_bytes: int  #: the intermediate map kept for backward on the feature map
    kernel_bytes: int  #: the layer's kernel, the budget for ``feature_bytes``
    on_features: bool  #: the choice

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def operator_cost_macs(device_type: str) -> int:
    """What one more operator in a step costs on ``device_type``, in multiply-adds."""
    return OPERATOR_COST_MACS.get(device_type, ACCELERATOR_OPERATOR_COST_MACS)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def plan_for(layer: nn.Module, x_shape: Sequence[int], padding: Tuple[int, int], itemsize: int,
             device_type: str = 'cpu') -> Optional[FeaturePlan]:
    """The choice for ``layer`` (an ``OREPAConv2d``) on an input of ``x_shape``
    (already padded for non-zero padding modes; ``padding`` is the conv's)
    with ``itemsize`` bytes per value on a ``device_type`` device, or None
    when its block has no branch that can run on the feature map."""
    generator = layer.branches
    branch = _FEATURE_BRANCH.get(type(generator))
    if branch is None or not generator.has(branch):
        return None
    n, _, h, w = x_shape
    k = layer.kernel_size[0]
    o, g, t = generator.out_channels, generator.groups, generator.internal
    in_g, t_g = generator.in_channels // g, t // g
    out_px = n * _out_size(h, k, layer.stride[0], padding[0], layer.dilation[0]) \
        * _out_size(w, k, layer.stride[1], padding[1], layer.dilation[1])
    if branch == '1x1_kxk':  # 1x1 on the input, then the layer's k x k conv
        kernel_macs = o * k * k * t_g * in_g
        first_px = n * h * w
        feature_macs = first_px * t * in_g + out_px * o * t_g * k * k
    else:  # l2i: the layer's (strided) 1x1 conv to t channels, then 1x1 to out
        kernel_macs = o * t_g * in_g
        first_px = out_px
        feature_macs = out_px * (t * in_g + o * t_g)
    feature_bytes = first_px * t * itemsize
    kernel_bytes = o * in_g * k * k * itemsize
    overhead_macs = FEATURE_PATH_OPERATORS[branch] * operator_cost_macs(device_type)
    if layer.feature_path == 'auto':
        on_features = feature_macs + overhead_macs < kernel_macs and feature_bytes <= kernel_bytes
    else:
        on_features = layer.feature_path == 'always'
    return FeaturePlan(branch, tuple(x_shape), kernel_macs, feature_macs, overhead_macs, feature_bytes, kernel_bytes,
                       on_features)


class _TwoConvs(torch.autograd.Function):
    """``conv(conv(x, first [+ identity]), scale * second)``, the two convs of
    a branch on the feature map.  Keeps the intermediate map (and ``x``, which
    the layer's own conv keeps too); the scaled kernel and ``first + identity``
    are recomputed in backward rather than kept.  Under autocast the convs run
    in the autocast dtype, like ``nn.Conv2d``'s."""

    @staticmethod
    def forward(ctx, x: Tensor, first: Tensor, identity: Optional[Tensor], second: Tensor, scale: Tensor,
                first_conv: Tuple[tuple, tuple], second_conv: Tuple[tuple, tuple, tuple], groups: int) -> Tensor:
        device_type = x.device.type
        dtype = compat.autocast_dtype(device_type) if compat.autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            x = x.to(dtype)
            w1, w2 = _weights(first, identity, second, scale, dtype)
            z = F.conv2d(x, w1, None, first_conv[0], first_conv[1], 1, groups)
            out = F.conv2d(z, w2, None, *second_conv, groups)
        ctx.first_conv, ctx.second_conv, ctx.groups = first_conv, second_conv, groups
        ctx.dtypes = (first.dtype, second.dtype, scale.dtype)
        ctx.save_for_backward(x, z, first, identity, second, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, z, first, identity, second, scale = ctx.saved_tensors
        need_x, need_first, _, need_second, need_scale = ctx.needs_input_grad[:5]
        stride1, padding1 = ctx.first_conv
        stride2, padding2, dilation2 = ctx.second_conv
        grad_x = grad_first = grad_second = grad_scale = None
        with torch.autocast(x.device.type, enabled=False):
            w1, w2 = _weights(first, identity, second, scale, x.dtype)
            need_z = need_x or need_first
            grad_z, grad_w2, _ = torch.ops.aten.convolution_backward(
                grad_out.to(x.dtype), z, w2, None, stride2, padding2, dilation2, False, [0, 0], ctx.groups,
                [need_z, need_second or need_scale, False])
            if grad_w2 is not None:
                grad_w2 = grad_w2.to(second.dtype).view_as(second)
                if need_second:
                    grad_second = grad_w2 * scale.to(second.dtype).view(-1, *([1] * (second.dim() - 1)))
                if need_scale:
                    grad_scale = (grad_w2 * second).flatten(1).sum(1).to(ctx.dtypes[2])
            if need_z:
                grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
                    grad_z, x, w1, None, stride1, padding1, (1, 1), False, [0, 0], ctx.groups,
                    [need_x, need_first, False])
                if grad_w1 is not None:
                    grad_first = grad_w1.view_as(first).to(ctx.dtypes[0])
        return grad_x, grad_first, None, grad_second, grad_scale, None, None, None


def _weights(first: Tensor, identity: Optional[Tensor], second: Tensor, scale: Tensor,
             dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The two convs' 4-D kernels in ``dtype``: ``first [+ identity]`` and ``scale * second``."""
    w1 = first if identity is None else first + identity
    w2 = second * scale.view(-1, *([1] * (second.dim() - 1)))
    return w1.reshape(w1.shape[0], w1.shape[1], 1, 1).to(dtype), \
        w2.reshape(w2.shape[0], w2.shape[1], *w2.shape[2:], *([1] * (4 - w2.dim()))).to(dtype)


def feature_branch_conv(layer: nn.Module, x: Tensor, padding: Tuple[int, int], branch: str) -> Tensor:
    """``branch`` of ``layer``'s block, computed on ``x`` (padded as for the layer's conv)."""
    generator = layer.branches
    scale = generator.scales()[generator.row(branch)]
    if branch == '1x1_kxk':
        return _TwoConvs.apply(x, generator.weight_1x1_kxk_first, generator.identity_1x1_kxk,
                               generator.weight_1x1_kxk_second, scale, ((1, 1), (0, 0)),
                               (layer.stride, padding, layer.dilation), generator.groups)
    return _TwoConvs.apply(x, generator.weight_l2i_first, None, generator.weight_l2i_second, scale,
                           (layer.stride, padding), ((1, 1), (0, 0), (1, 1)), generator.groups)


def feature_path_report(model: nn.Module) -> List[Dict[str, Any]]:
    """Each OREPA layer's last training-step choice (:class:`FeaturePlan`
    fields plus the layer's name), in module order; layers without a branch
    that can run on the feature map, or not run in training yet, are left out."""
    rows = []
    for name, module in model.named_modules():
        plan = getattr(module, 'feature_plan', None)
        if isinstance(plan, FeaturePlan):
            rows.append({'layer': name, **plan.as_dict()})
    return rows
