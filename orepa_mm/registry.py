"""Registration of orepa_mm's modules into the OpenMMLab 2.x registries.

Conv layers go into mmengine's root ``MODELS`` (found from every scope, so
``conv_cfg=dict(type='OREPA')`` works under mmdet and mmseg) and into the
``orepa_mm`` child registry (so ``type='orepa_mm.OREPA'`` works too).
Backbones go into mmdet's and mmseg's own ``MODELS`` (their ResNets differ),
each only when that framework is installed.
"""
from __future__ import annotations

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

#: orepa_mm's own model registry (scope ``orepa_mm``).
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='orepa_mm', locations=['orepa_mm'])


def register_conv_layers() -> None:
    from .layers import DBBConv2d, OREPAConv2d
    for registry in (MMENGINE_MODELS, MODELS):
        for name, cls in (('OREPA', OREPAConv2d), ('OREPAConv2d', OREPAConv2d),
                          ('DBB', DBBConv2d), ('DBBConv2d', DBBConv2d)):
            if name not in registry.module_dict:
                registry.register_module(name=name, module=cls)
