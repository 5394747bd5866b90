"""The one place that turns a re-parameterizable model into a plain one."""
from __future__ import annotations

import copy
import re
from typing import Optional

import torch
import torch.nn as nn

from . import kernels as K
from .layers.base import ReparamConv2d

__all__ = ['fuse_model', 'count_reparam_layers']

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, )


def count_reparam_layers(model: nn.Module) -> int:
    """Number of OREPA/DBB layers in ``model``."""
    return sum(isinstance(m, ReparamConv2d) for m in model.modules())


def _following_norm(parent: nn.Module, name: str) -> Optional[nn.Module]:
    """The BatchNorm that consumes the output of ``parent.<name>``, if known.

    Covers the layouts of OpenMMLab models: ``nn.Sequential`` (next child),
    mmcv's ``ConvModule`` (``conv`` -> ``norm`` when the norm comes right
    after the conv) and mmdet/mmseg ResNet blocks and stems (``convN`` ->
    ``normN``/``bnN``).
    """
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        i = names.index(name)
        nxt = parent[i + 1] if i + 1 < len(names) else None
        return nxt if isinstance(nxt, _NORM_TYPES) else None
    order = getattr(parent, 'order', None)
    if name == 'conv' and getattr(parent, 'with_norm', False) and order is not None:
        if list(order).index('norm') == list(order).index('conv') + 1:
            return parent.norm
        return None
    m = re.fullmatch(r'conv(\d*)', name)
    if m:
        for attr in (f'norm{m.group(1)}_name', ):
            if isinstance(getattr(parent, attr, None), str):
                norm = getattr(parent, getattr(parent, attr))
                return norm if isinstance(norm, _NORM_TYPES) else None
        for attr in (f'norm{m.group(1)}', f'bn{m.group(1)}'):
            norm = getattr(parent, attr, None)
            if isinstance(norm, _NORM_TYPES):
                return norm
    return None


@torch.no_grad()
def _fuse_child(parent: nn.Module, name: str, layer: ReparamConv2d) -> None:
    conv = layer.fuse()
    if conv.bias is not None and layer.bias is None:
        # The vanilla layout of this layer has no bias (e.g. a ResNet conv
        # before its BN): fold the fused bias into the BN's running mean.
        norm = _following_norm(parent, name)
        if norm is None or norm.running_mean is None:
            raise RuntimeError(
                f'cannot fuse {type(layer).__name__} at {name!r}: its fused conv has a bias that the '
                'layer was built without, and no BatchNorm follows it to absorb that bias')
        norm.running_mean.copy_(K.fold_bias_into_bn(conv.bias, norm.running_mean))
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        plain.weight.copy_(conv.weight)
        plain.train(conv.training)
        conv = plain
    setattr(parent, name, conv)


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every OREPA/DBB layer of ``model`` by its equivalent ``nn.Conv2d``.

    The result has exactly the ``state_dict`` keys and shapes of the same
    model built with ``conv_cfg=None``: a bias that the vanilla layer lacks is
    folded into the following BatchNorm.  Fusing uses BN running statistics,
    so the result equals the original in eval mode.  Idempotent: a fused
    model is returned unchanged.

    Args:
        model: any module tree (a whole detector, a backbone, a single layer).
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if isinstance(model, ReparamConv2d):
        return model.fuse()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ReparamConv2d):
                _fuse_child(parent, name, child)
    return model
