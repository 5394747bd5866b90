"""OREPA/DBB ResNets registered into mmdet's ``MODELS`` (imports mmdet).

Each is mmdet's own ResNet class (every argument accepted) with
re-parameterizable convs; ``fuse()`` turns it into ``vanilla_type``.
"""
from mmdet.models.backbones.resnet import ResNet, ResNetV1d
from mmdet.registry import MODELS

from .resnet_common import ReparamResNetMixin

__all__ = ['OREPAResNet', 'OREPAResNetV1c', 'OREPAResNetV1d', 'DBBResNet', 'DBBResNetV1c', 'DBBResNetV1d']


@MODELS.register_module()
class OREPAResNet(ReparamResNetMixin, ResNet):
    """mmdet ``ResNet`` with OREPA convs; fuses into ``ResNet``."""
    conv_kind, vanilla_type = 'OREPA', 'ResNet'


@MODELS.register_module()
class OREPAResNetV1c(ReparamResNetMixin, ResNet):
    """mmdet ``ResNet(deep_stem=True)`` (mmdet has no V1c class) with OREPA convs."""
    conv_kind, vanilla_type, default_kwargs = 'OREPA', 'ResNet', {'deep_stem': True}


@MODELS.register_module()
class OREPAResNetV1d(ReparamResNetMixin, ResNetV1d):
    """mmdet ``ResNetV1d`` with OREPA convs; fuses into ``ResNetV1d``."""
    conv_kind, vanilla_type = 'OREPA', 'ResNetV1d'


@MODELS.register_module()
class DBBResNet(ReparamResNetMixin, ResNet):
    """mmdet ``ResNet`` with DBB 3x3 convs (the paper's baseline); fuses into ``ResNet``."""
    conv_kind, vanilla_type = 'DBB', 'ResNet'


@MODELS.register_module()
class DBBResNetV1c(ReparamResNetMixin, ResNet):
    """mmdet ``ResNet(deep_stem=True)`` with DBB 3x3 convs."""
    conv_kind, vanilla_type, default_kwargs = 'DBB', 'ResNet', {'deep_stem': True}


@MODELS.register_module()
class DBBResNetV1d(ReparamResNetMixin, ResNetV1d):
    """mmdet ``ResNetV1d`` with DBB 3x3 convs; fuses into ``ResNetV1d``."""
    conv_kind, vanilla_type = 'DBB', 'ResNetV1d'
