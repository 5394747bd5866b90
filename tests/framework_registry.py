"""Discovery shared by the sweeps: the frameworks' ``MODELS`` registries and
which registered classes take ``conv_cfg``."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Set


def registries() -> Dict[str, Any]:
    """``{'mmdet': MODELS, 'mmseg': MODELS, 'mmpretrain': MODELS}`` with every
    model registered."""
    import mmdet.models  # noqa: F401 - registers the models
    import mmpretrain.models  # noqa: F401
    import mmseg.models  # noqa: F401
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    return {'mmdet': MMDET_MODELS, 'mmseg': MMSEG_MODELS, 'mmpretrain': MMPRETRAIN_MODELS}


def takes_conv_cfg(cls: type) -> bool:
    """Whether ``cls(conv_cfg=...)`` reaches a constructor with a ``conv_cfg``
    argument (directly, or through ``**kwargs`` passed up the MRO)."""
    for klass in cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        if 'conv_cfg' in params:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def discover(packages: Iterable[str]) -> Set[str]:
    """``'<scope>.<name>'`` of every class registered in a framework's
    ``MODELS`` from ``<scope>.models.<package>`` that takes ``conv_cfg``."""
    found = set()
    for scope, registry in registries().items():
        prefixes = tuple(f'{scope}.models.{package}' for package in packages)
        for name, cls in registry.module_dict.items():
            if isinstance(cls, type) and cls.__module__.startswith(prefixes) and takes_conv_cfg(cls):
                found.add(f'{scope}.{name}')
    return found
