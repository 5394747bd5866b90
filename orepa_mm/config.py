"""Loading mmdet/mmseg/mmpretrain configs for orepa_mm's tools: one function, one set of checks.

A config names its framework with ``default_scope`` (``mmdet``, ``mmseg``
or ``mmpretrain``); that framework's modules are registered before anything is
built, as ``mim`` and the frameworks' own ``tools/train.py`` do.
"""
from __future__ import annotations

import importlib
import os.path as osp
from typing import Any, Dict, Optional

import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import Registry

from .cli import ToolError

__all__ = ['ConfigError', 'FRAMEWORKS', 'load_config', 'model_registry', 'build_model']

#: The ``default_scope`` values orepa_mm's tools accept.
FRAMEWORKS = ('mmdet', 'mmseg', 'mmpretrain')


class ConfigError(ToolError):
    """A config file that cannot be used; the message says why."""


def load_config(path: str, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """Read ``path``, merge ``cfg_options`` and register the config's framework.

    Raises:
        ConfigError: the file does not exist, or its ``default_scope`` is not
            one of :data:`FRAMEWORKS`.
    """
    if not osp.isfile(path):
        raise ConfigError(f'config not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in FRAMEWORKS:
        raise ConfigError(f'{path}: default_scope must be one of {FRAMEWORKS}, got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return cfg


def model_registry(scope: str) -> Registry:
    """The ``MODELS`` registry of the framework ``scope``."""
    return importlib.import_module(f'{scope}.registry').MODELS


def build_model(cfg: Config, model_cfg: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build ``model_cfg`` (default: ``cfg.model``) in ``cfg``'s framework, in eval mode."""
    model = model_registry(cfg.default_scope).build(cfg.model if model_cfg is None else model_cfg)
    return model.eval()
