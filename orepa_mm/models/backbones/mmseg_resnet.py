"""OREPA/DBB ResNets registered into mmseg's ``MODELS`` (imports mmseg)."""
from mmseg.models.backbones.resnet import ResNet, ResNetV1c, ResNetV1d
from mmseg.registry import MODELS

from .resnet_common import make_reparam_resnet

OREPAResNet = make_reparam_resnet(ResNet, 'OREPAResNet', 'OREPA', 'ResNet', 'mmseg')
OREPAResNetV1c = make_reparam_resnet(ResNetV1c, 'OREPAResNetV1c', 'OREPA', 'ResNetV1c', 'mmseg')
OREPAResNetV1d = make_reparam_resnet(ResNetV1d, 'OREPAResNetV1d', 'OREPA', 'ResNetV1d', 'mmseg')
DBBResNet = make_reparam_resnet(ResNet, 'DBBResNet', 'DBB', 'ResNet', 'mmseg')
DBBResNetV1c = make_reparam_resnet(ResNetV1c, 'DBBResNetV1c', 'DBB', 'ResNetV1c', 'mmseg')
DBBResNetV1d = make_reparam_resnet(ResNetV1d, 'DBBResNetV1d', 'DBB', 'ResNetV1d', 'mmseg')

BACKBONES = (OREPAResNet, OREPAResNetV1c, OREPAResNetV1d, DBBResNet, DBBResNetV1c, DBBResNetV1d)
for _cls in BACKBONES:
    if _cls.__name__ not in MODELS.module_dict:
        MODELS.register_module(module=_cls)
