"""What the OREPA/DBB ResNets of mmdet and mmseg share.

A re-param ResNet is the framework's own ResNet class built with a
re-parameterizable ``conv_cfg``; the ResNet's BNs follow its convs as usual.

* ``OREPA``: every conv (stem, 1x1, k x k, downsample shortcut) becomes an
  OREPA layer, the 7x7 stem the linear deep stem; the ResNet's BNs are the
  "one BN after the sum".
* ``DBB``: the paper's baseline; only the 3x3 convs become DBB layers, whose
  inner BNs take the backbone's ``norm_cfg`` type.
  ``conv_cfg=dict(type='DBB', every_conv=True)`` converts every conv.

The subclass adds the default ``conv_cfg``, a check that it is
re-parameterizable, ``fuse()`` and the vanilla config used for deploy
checkpoints.
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

    BNs inside DBB layers:

    * ``frozen_stages``: a frozen stage's DBB layers are in eval mode, their
      BNs included (stem too), whatever ``norm_eval`` says.
    * ``norm_eval=True`` (mmdet's default): every BN of the backbone stays in
      eval mode, the DBB layers' inner BNs too, as the framework does for any
      BN.  Started from a plain checkpoint, a DBB layer then trains as a
      linear block that starts exactly as the pretrained conv (its origin BN
      a pass-through, the other branches at scale 0): training-mode inner
      BNs would normalise the origin conv's output with batch statistics
      while the frozen BN after the layer still expects the pretrained
      scale, i.e. start from a different function.  ``norm_eval=False`` (the
      segmentation configs) trains every BN, the DBB block as published.
    """

    conv_kind: str = 'OREPA'
    vanilla_type: str = 'ResNet'
    default_kwargs: Dict[str, Any] = {}

    def __init__(self, *args: Any, conv_cfg: Optional[dict] = None, **kwargs: Any) -> None:
        if conv_cfg is None:
            conv_cfg = dict(type=self.conv_kind)
        for key, value in self.default_kwargs.items():
            kwargs.setdefault(key, value)
        kind = reparam_conv_kind(conv_cfg)
        if kind is None:
            raise ValueError(f'{type(self).__name__} needs a re-parameterizable conv_cfg '
                             f"(type 'OREPA' or 'DBB'), got {conv_cfg!r}; use "
                             f'{self.vanilla_type} for plain convs')
        if kind == 'DBB' and 'norm_cfg' in kwargs and 'norm_cfg' not in conv_cfg:
            # The BNs inside DBB layers are of the backbone's norm type (SyncBN in
            # the segmentation configs); a norm that cannot be folded (GN...) is
            # refused when the layers are built.
            conv_cfg = dict(conv_cfg, norm_cfg=kwargs['norm_cfg'])
        super().__init__(*args, conv_cfg=conv_cfg, **kwargs)

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        if self.frozen_stages >= 0 and not self.deep_stem:
            # The framework puts only norm1 of a frozen plain stem in eval mode;
            # a re-param stem conv (DBB with every_conv) has BNs of its own.
            self.conv1.eval()

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
