"""Registration of orepa_mm's modules into the OpenMMLab 2.x registries.

Conv layers go into mmengine's root ``MODELS`` (found from every scope, so
``conv_cfg=dict(type='OREPA')`` works under mmdet, mmseg and mmpretrain) and into the
``orepa_mm`` child registry (so ``type='orepa_mm.OREPA'`` works too).
Backbones go into mmdet's, mmseg's and mmpretrain's own ``MODELS`` (their
ResNets differ), each only when that framework is installed.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

from .layers import DBBConv2d, OREPAConv2d, dbb_conv

#: orepa_mm's own model registry (scope ``orepa_mm``).
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='orepa_mm', locations=['orepa_mm'])

#: Every ``conv_cfg`` type orepa_mm registers: name -> (family, builder).
#: ``'OREPA'`` and the classes make every conv they build a re-param layer;
#: ``'DBB'`` is the paper's DBB baseline, k x k convs only
#: (:func:`orepa_mm.layers.dbb_conv`; ``every_conv=True`` for all).
CONV_TYPES: Dict[str, Tuple[str, Callable[..., nn.Module]]] = {
    'OREPA': ('OREPA', OREPAConv2d),
    'OREPAConv2d': ('OREPA', OREPAConv2d),
    'DBB': ('DBB', dbb_conv),
    'DBBConv2d': ('DBB', DBBConv2d),
}


def reparam_conv_kind(conv_cfg: Optional[dict]) -> Optional[str]:
    """'OREPA', 'DBB' or None for a ``conv_cfg`` whose type is one of
    :data:`CONV_TYPES` (a name, with or without the ``orepa_mm.`` prefix, or
    the builder itself)."""
    if not isinstance(conv_cfg, dict):
        return None
    t = conv_cfg.get('type')
    if isinstance(t, str):
        entry = CONV_TYPES.get(t.split('.')[-1])
        return entry[0] if entry else None
    return next((family for family, builder in CONV_TYPES.values() if builder is t), None)


def register_conv_layers() -> None:
    """Register :data:`CONV_TYPES` into mmengine's root ``MODELS`` and orepa_mm's."""
    for registry in (MMENGINE_MODELS, MODELS):
        for name, (_, builder) in CONV_TYPES.items():
            if name not in registry.module_dict:
                registry.register_module(name=name, module=builder)
