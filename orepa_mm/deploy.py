"""Deploying a fused model: its vanilla config, and the check that it computes
what the training-time model computes.

:func:`orepa_mm.fuse_model` turns the modules into plain ones;
:func:`deploy_config` turns the config into the one that builds them with
vanilla mmdet/mmseg/mmpretrain (no orepa_mm import); :func:`max_relative_gap` compares
the two models' raw outputs.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, List

import torch
import torch.nn as nn
from mmengine.config import Config

from .config import model_registry
from .models.backbones import ReparamResNetMixin, reparam_conv_kind

__all__ = ['deploy_config', 'max_relative_gap', 'model_outputs', 'reparam_conv_cfgs']


def _is_pretrained(init_cfg: Any) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def _vanilla_node(node: Any, registry) -> Any:
    """``node`` with every re-param backbone and re-param ``conv_cfg`` made vanilla.

    A re-param backbone becomes its vanilla type (plus the defaults its
    variant adds, e.g. mmdet's ``deep_stem=True`` for V1c); a re-param
    ``conv_cfg`` becomes ``None``.  Pretrained initialisation is dropped from
    the nodes that change: the deploy checkpoint carries the weights.
    """
    if isinstance(node, (list, tuple)):
        return type(node)(_vanilla_node(v, registry) for v in node)
    if not isinstance(node, dict):
        return node
    node = {k: _vanilla_node(v, registry) for k, v in node.items()}
    t = node.get('type')
    cls = registry.get(t) if isinstance(t, str) else t
    changed = False
    if isinstance(cls, type) and issubclass(cls, ReparamResNetMixin):
        node['type'] = cls.vanilla_type
        for key, value in cls.default_kwargs.items():
            node.setdefault(key, value)
        node['conv_cfg'] = None
        node.pop('init_cfg', None)  # the deploy checkpoint initialises the whole backbone
        changed = True
    else:
        for key, value in node.items():  # conv_cfg, and any other conv config (e.g. a predictor_cfg)
            if reparam_conv_kind(value):
                node[key] = None
                changed = True
    if changed:
        node.pop('pretrained', None)
        if _is_pretrained(node.get('init_cfg')):
            node.pop('init_cfg')
    return node


def reparam_conv_cfgs(node: Any, path: str = 'model') -> List[str]:
    """The dotted paths of every re-param conv config (``type`` OREPA/DBB) in
    a (model) config; a deploy config has none."""
    if isinstance(node, (list, tuple)):
        return [p for i, v in enumerate(node) for p in reparam_conv_cfgs(v, f'{path}[{i}]')]
    if not isinstance(node, dict):
        return []
    if reparam_conv_kind(node):
        return [path]
    return [p for k, v in node.items() for p in reparam_conv_cfgs(v, f'{path}.{k}')]


def deploy_config(cfg: Config) -> Config:
    """The config of ``cfg``'s fused model for vanilla mmdet/mmseg/mmpretrain.

    Every re-param backbone and ``conv_cfg`` is replaced by its vanilla
    counterpart, the ``orepa_mm`` import is removed, and nothing is loaded
    from elsewhere (no pretrained backbone, ``load_from=None``,
    ``resume=False``): the deploy checkpoint holds every weight.
    """
    data = copy.deepcopy(cfg.to_dict())
    model = _vanilla_node(data['model'], model_registry(cfg.default_scope))
    model.pop('pretrained', None)
    backbone = model.get('backbone')
    if isinstance(backbone, dict) and _is_pretrained(backbone.get('init_cfg')):
        backbone.pop('init_cfg')
    data['model'] = model
    imports = data.get('custom_imports')
    if imports:
        rest = [m for m in imports.get('imports', []) if not str(m).startswith('orepa_mm')]
        if rest:
            data['custom_imports'] = dict(imports, imports=rest)
        else:
            data.pop('custom_imports')
    data['load_from'] = None
    data['resume'] = False
    return Config(data)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj.float()
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@torch.no_grad()
def model_outputs(model: nn.Module, batch: dict) -> List[torch.Tensor]:
    """The raw output tensors of an mmdet/mmseg/mmpretrain model (``mode='tensor'``) on a
    preprocessed batch; the features of a model without a tensor mode; the
    output of a plain module (no data preprocessor) on ``batch['inputs']``."""
    inputs, samples = batch['inputs'], batch.get('data_samples')
    if not hasattr(model, 'data_preprocessor'):  # a plain module: a backbone, backbone + neck
        return list(_tensors(model(inputs)))
    try:
        out = model(inputs, samples, mode='tensor')
    except Exception:
        if not hasattr(model, 'extract_feat'):
            raise
        out = model.extract_feat(inputs)
    return list(_tensors(out))


def max_relative_gap(model: nn.Module, fused: nn.Module, batches: Iterable[dict]) -> float:
    """Largest ``max|a - b| / max|a|`` over the raw outputs of two models on
    preprocessed batches (``inf`` when the outputs' shapes differ)."""
    worst = 0.0
    for batch in batches:
        outs_a, outs_b = model_outputs(model, batch), model_outputs(fused, batch)
        if [a.shape for a in outs_a] != [b.shape for b in outs_b]:
            return float('inf')  # e.g. a different number of detections
        for a, b in zip(outs_a, outs_b):
            if a.numel() == 0:
                continue
            scale = a.abs().max().item() or 1.0
            worst = max(worst, (a - b).abs().max().item() / scale)
    return worst
