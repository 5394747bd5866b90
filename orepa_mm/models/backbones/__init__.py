"""Re-param ResNet backbones, registered into each installed framework.

mmdet, mmseg and mmpretrain are optional: each framework's backbones are defined (and
its model package imported) only when that framework is installed.
"""
import importlib
import importlib.util

from .resnet_common import ReparamResNetMixin, reparam_conv_kind

__all__ = ['ReparamResNetMixin', 'reparam_conv_kind', 'register_backbones']


def register_backbones() -> list:
    """Import (and so register) the backbones of every installed framework.

    Returns the names of the frameworks registered."""
    done = []
    for framework in ('mmdet', 'mmseg', 'mmpretrain'):
        if importlib.util.find_spec(framework) is not None:
            importlib.import_module(f'{__name__}.{framework}_resnet')
            done.append(framework)
    return done
