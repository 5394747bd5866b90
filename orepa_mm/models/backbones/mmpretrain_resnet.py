"""OREPA/DBB ResNets registered into mmpretrain's ``MODELS`` (imports mmpretrain).

Each is mmpretrain's own ResNet class (every argument accepted) with
re-parameterizable convs; ``fuse()`` turns it into ``vanilla_type``.  These
are the backbones of the ImageNet classifiers whose weights the detection and
segmentation configs start from.
"""
from mmpretrain.models.backbones.resnet import ResNet, ResNetV1c, ResNetV1d
from mmpretrain.registry import MODELS

from .resnet_common import ReparamResNetMixin

__all__ = ['OREPAResNet', 'OREPAResNetV1c', 'OREPAResNetV1d', 'DBBResNet', 'DBBResNetV1c', 'DBBResNetV1d']


@MODELS.register_module()
class OREPAResNet(ReparamResNetMixin, ResNet):
    """mmpretrain ``ResNet`` with OREPA convs; fuses into ``ResNet``."""
    conv_kind, vanilla_type = 'OREPA', 'ResNet'


@MODELS.register_module()
class OREPAResNetV1c(ReparamResNetMixin, ResNetV1c):
    """mmpretrain ``ResNetV1c`` with OREPA convs; fuses into ``ResNetV1c``."""
    conv_kind, vanilla_type = 'OREPA', 'ResNetV1c'


@MODELS.register_module()
class OREPAResNetV1d(ReparamResNetMixin, ResNetV1d):
    """mmpretrain ``ResNetV1d`` with OREPA convs; fuses into ``ResNetV1d``."""
    conv_kind, vanilla_type = 'OREPA', 'ResNetV1d'


@MODELS.register_module()
class DBBResNet(ReparamResNetMixin, ResNet):
    """mmpretrain ``ResNet`` with DBB 3x3 convs (the paper's baseline); fuses into ``ResNet``."""
    conv_kind, vanilla_type = 'DBB', 'ResNet'


@MODELS.register_module()
class DBBResNetV1c(ReparamResNetMixin, ResNetV1c):
    """mmpretrain ``ResNetV1c`` with DBB 3x3 convs; fuses into ``ResNetV1c``."""
    conv_kind, vanilla_type = 'DBB', 'ResNetV1c'


@MODELS.register_module()
class DBBResNetV1d(ReparamResNetMixin, ResNetV1d):
    """mmpretrain ``ResNetV1d`` with DBB 3x3 convs; fuses into ``ResNetV1d``."""
    conv_kind, vanilla_type = 'DBB', 'ResNetV1d'
