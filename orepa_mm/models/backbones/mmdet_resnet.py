"""OREPA/DBB ResNets registered into mmdet's ``MODELS`` (imports mmdet)."""
from mmdet.models.backbones.resnet import ResNet, ResNetV1d
from mmdet.registry import MODELS

from .resnet_common import make_reparam_resnet

# mmdet has no ResNetV1c class: V1c is ResNet(deep_stem=True).
OREPAResNet = make_reparam_resnet(ResNet, 'OREPAResNet', 'OREPA', 'ResNet', 'mmdet')
OREPAResNetV1c = make_reparam_resnet(ResNet, 'OREPAResNetV1c', 'OREPA', 'ResNet', 'mmdet', deep_stem=True)
OREPAResNetV1d = make_reparam_resnet(ResNetV1d, 'OREPAResNetV1d', 'OREPA', 'ResNetV1d', 'mmdet')
DBBResNet = make_reparam_resnet(ResNet, 'DBBResNet', 'DBB', 'ResNet', 'mmdet')
DBBResNetV1c = make_reparam_resnet(ResNet, 'DBBResNetV1c', 'DBB', 'ResNet', 'mmdet', deep_stem=True)
DBBResNetV1d = make_reparam_resnet(ResNetV1d, 'DBBResNetV1d', 'DBB', 'ResNetV1d', 'mmdet')

BACKBONES = (OREPAResNet, OREPAResNetV1c, OREPAResNetV1d, DBBResNet, DBBResNetV1c, DBBResNetV1d)
for _cls in BACKBONES:
    if _cls.__name__ not in MODELS.module_dict:
        MODELS.register_module(module=_cls)
