"""What the OREPA/DBB ResNets of mmdet and mmseg share.

A re-param ResNet is the framework's own ResNet class built with a
re-parameterizable ``conv_cfg``: every conv (stem, 1x1, k x k, downsample
shortcut) becomes an OREPA (or DBB) layer, the 7x7 stem the linear deep stem,
and the ResNet's BNs are the "one BN after the sum".  The subclass adds the
default ``conv_cfg``, a check that it is re-parameterizable, ``fuse()`` and
the vanilla config used for deploy checkpoints.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch.nn as nn

from ...fuse import fuse_model
from ...registry import reparam_conv_kind

__all__ = ['ReparamResNetMixin', 'reparam_conv_kind']


class ReparamResNetMixin:
    """Mixin for ``ResNet`` subclasses whose convs are OREPA or DBB layers.

    Class attributes, set by each backbone class:
        conv_kind: 'OREPA' or 'DBB', the default ``conv_cfg`` type.
        vanilla_type: registry name of the plain backbone (``ResNetV1c``...).
        default_kwargs: defaults this variant adds to the base class's, kept
            in the vanilla config (``deep_stem=True`` for mmdet's V1c, which
            has no class of its own).
    """

    conv_kind: str = 'OREPA'
    vanilla_type: str = 'ResNet'
    default_kwargs: Dict[str, Any] = {}

    def __init__(self, *args: Any, conv_cfg: Optional[dict] = None, **kwargs: Any) -> None:
        if conv_cfg is None:
            conv_cfg = dict(type=self.conv_kind)
        for key, value in self.default_kwargs.items():
            kwargs.setdefault(key, value)
        if reparam_conv_kind(conv_cfg) is None:
            raise ValueError(f'{type(self).__name__} needs a re-parameterizable conv_cfg '
                             f"(type 'OREPA' or 'DBB'), got {conv_cfg!r}; use "
                             f'{self.vanilla_type} for plain convs')
        super().__init__(*args, conv_cfg=conv_cfg, **kwargs)

    def fuse(self) -> nn.Module:
        """Fuse every re-param layer in place; the backbone then has the
        state_dict layout of ``vanilla_config()``'s backbone."""
        return fuse_model(self, inplace=True)

    @classmethod
    def vanilla_config(cls, cfg: Dict[str, Any]) -> Dict[str, Any]:
        """The plain-backbone config equivalent to ``cfg`` after fusing: the
        vanilla type, ``conv_cfg=None`` and no pretrained initialisation."""
        out = copy.deepcopy(dict(cfg))
        out['type'] = cls.vanilla_type
        for key, value in cls.default_kwargs.items():
            out.setdefault(key, value)
        out['conv_cfg'] = None
        out.pop('init_cfg', None)
        out.pop('pretrained', None)
        return out
