"""Turn a training checkpoint of an OREPA/DBB model into a deploy checkpoint.

    python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR [--verify] [--onnx]
                                    [--backbone-only] [--force]

Builds the model from CONFIG, loads CHECKPOINT (weights-only), replaces every
OREPA/DBB layer (backbone, neck or head) by its plain conv with
``orepa_mm.fuse_model`` and writes

* ``OUT_DIR/<name>_fused.pth``: an mmengine checkpoint (``state_dict`` and
  ``meta``, no optimizer state) that vanilla mmdet/mmseg load;
* ``OUT_DIR/<name>_fused.py``: the deploy config, with every OREPA/DBB
  backbone or ``conv_cfg`` replaced by the vanilla one, no ``orepa_mm``
  import and no pretrained initialisation;

or, with ``--backbone-only``, ``OUT_DIR/<name>_fused_backbone.pth``: the
fused backbone's weights in the vanilla backbone's key layout (usable as
``init_cfg=dict(type='Pretrained', checkpoint=...)``).

``--verify`` compares the training-time and the fused model in eval mode on
samples of the config's test set (random input if it cannot be loaded) and
exits non-zero when the largest relative difference exceeds 1e-5.
``--onnx`` exports the fused backbone (and backbone + neck) and checks
onnxruntime against PyTorch.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import os.path as osp
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

import orepa_mm
from orepa_mm.checkpoint import CheckpointError, load_checkpoint_file
from orepa_mm.models.backbones import ReparamResNetMixin, reparam_conv_kind

VERIFY_TOL = 1e-5


class FuseError(RuntimeError):
    """Bad input; the message says what is wrong."""


# -- atomic output --------------------------------------------------------------
def _atomic_write(path: str, write) -> None:
    """Write via a temporary file in the target folder, then rename."""
    # Keep the extension: mmengine picks the config dump format from it.
    fd, tmp = tempfile.mkstemp(dir=osp.dirname(path) or '.', prefix='.' + osp.basename(path) + '.',
                               suffix=osp.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


# -- config handling ------------------------------------------------------------
def load_config(path: str):
    from mmengine.config import Config
    if not osp.isfile(path):
        raise FuseError(f'config not found: {path}')
    cfg = Config.fromfile(path)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise FuseError(f'{path}: default_scope must be mmdet or mmseg, got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return cfg


def _registry(scope: str):
    return importlib.import_module(f'{scope}.registry').MODELS


def _vanilla(node: Any, models) -> Any:
    """Recursively replace re-param backbones and conv_cfgs by vanilla ones."""
    if isinstance(node, dict):
        node = {k: _vanilla(v, models) for k, v in node.items()}
        t = node.get('type')
        cls = models.get(t) if isinstance(t, str) else t
        if isinstance(cls, type) and issubclass(cls, ReparamResNetMixin):
            node = cls.vanilla_config(node)
        if 'conv_cfg' in node and reparam_conv_kind(node['conv_cfg']):
            node['conv_cfg'] = None
            if isinstance(node.get('init_cfg'), dict) and node['init_cfg'].get('type') == 'Pretrained':
                node.pop('init_cfg')
        return node
    if isinstance(node, (list, tuple)):
        return type(node)(_vanilla(v, models) for v in node)
    return node


def deploy_config(cfg) -> Any:
    """The vanilla config of the fused model (see module docstring)."""
    from mmengine.config import Config
    scope = cfg.default_scope
    data = copy.deepcopy(cfg.to_dict())
    model = _vanilla(data['model'], _registry(scope))
    model.pop('pretrained', None)
    backbone = model.get('backbone', {})
    if isinstance(backbone.get('init_cfg'), dict) and backbone['init_cfg'].get('type') == 'Pretrained':
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


# -- model and checkpoint -------------------------------------------------------
def build_model(cfg) -> nn.Module:
    model = _registry(cfg.default_scope).build(cfg.model)
    model.eval()
    return model


def _state_dict_of(ckpt: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict'), dict):
        sd = ckpt['state_dict']
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt
    else:
        raise FuseError(f'{path} holds no state_dict')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def load_training_checkpoint(model: nn.Module, ckpt: Any, path: str) -> None:
    """Load strictly; explain an already-fused or mismatched checkpoint."""
    sd = _state_dict_of(ckpt, path)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    fused_keys = set(orepa_mm.fuse_model(model).state_dict())
    model_keys = set(model.state_dict())
    if (isinstance(meta, dict) and meta.get('orepa_mm_fused')) or (set(sd) == fused_keys != model_keys):
        raise FuseError(f'{path} is already fused (it has the vanilla layout and no re-param branches); '
                        'use it with its deploy config instead of fusing it again')
    missing = sorted(model_keys - set(sd))
    unexpected = sorted(set(sd) - model_keys)
    if missing or unexpected:
        raise FuseError(f'{path} does not match the config: {len(missing)} missing keys (e.g. {missing[:3]}), '
                        f'{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')
    own = model.state_dict()
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise FuseError(f'{path} does not match the config: shape mismatch for {bad[:3]} '
                        f'({tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})')
    model.load_state_dict(sd, strict=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- verification ---------------------------------------------------------------
def _flatten(obj: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj.float()
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)


def sample_batches(cfg, model: nn.Module, n: int = 2) -> Tuple[List[Any], str]:
    """Batches from the config's test pipeline, else random input."""
    try:
        from mmengine.runner import Runner
        loader_cfg = copy.deepcopy(cfg.test_dataloader)
        loader_cfg['batch_size'] = 1
        loader_cfg['num_workers'] = 0
        loader_cfg['persistent_workers'] = False
        loader = Runner.build_dataloader(loader_cfg)
        batches = []
        for i, batch in enumerate(loader):
            if i >= n:
                break
            batches.append(model.data_preprocessor(batch, False))
        if batches:
            return batches, 'test set'
    except Exception as e:  # no dataset on this machine: fall back to noise
        print(f'[fuse] test data unavailable ({type(e).__name__}: {str(e)[:80]}); using random input')
    torch.manual_seed(0)
    return [dict(inputs=torch.randn(1, 3, 256, 256), data_samples=None) for _ in range(n)], 'random input'


def _run(model: nn.Module, batch: dict) -> List[torch.Tensor]:
    with torch.no_grad():
        inputs, samples = batch['inputs'], batch.get('data_samples')
        try:
            out = model(inputs, samples, mode='tensor')
        except Exception:
            if not hasattr(model, 'extract_feat'):
                raise
            out = model.extract_feat(inputs)
    return list(_flatten(out))


def verify(model: nn.Module, fused: nn.Module, batches: List[dict]) -> float:
    worst = 0.0
    for batch in batches:
        outs_a, outs_b = _run(model, batch), _run(fused, batch)
        if [a.shape for a in outs_a] != [b.shape for b in outs_b]:
            return float('inf')  # e.g. a different number of detections
        for a, b in zip(outs_a, outs_b):
            if a.numel() == 0:
                continue
            scale = a.abs().max().item() or 1.0
            worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def export_onnx(fused: nn.Module, out_dir: str, name: str, input_shape=(1, 3, 224, 224)) -> Dict[str, float]:
    """Export the backbone (and backbone + neck) and compare onnxruntime with torch."""
    import onnxruntime as ort

    parts: Dict[str, nn.Module] = {'backbone': fused.backbone}
    if getattr(fused, 'neck', None) is not None:
        parts['backbone_neck'] = nn.Sequential(fused.backbone, fused.neck)
    x = torch.randn(*input_shape)
    errors = {}
    for part, module in parts.items():
        module.eval()
        path = osp.join(out_dir, f'{name}_fused_{part}.onnx')
        with torch.no_grad():
            ref = list(_flatten(module(x)))

        def write(tmp: str, module=module) -> None:
            torch.onnx.export(module, (x,), tmp, opset_version=17, dynamo=False)
        _atomic_write(path, write)
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        errors[part] = max((r - torch.from_numpy(g)).abs().max().item() / (r.abs().max().item() or 1.0)
                           for r, g in zip(ref, got))
        print(f'[fuse] ONNX {part}: {path} (onnxruntime vs torch, max rel. diff {errors[part]:.2e})')
    return errors


# -- main -----------------------------------------------------------------------
def fuse_checkpoint(config: str, checkpoint: str, out_dir: str, backbone_only: bool = False,
                    do_verify: bool = False, onnx: bool = False, force: bool = False) -> Dict[str, Any]:
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('orepa_mm.fuse', log_level='INFO')
    name = osp.splitext(osp.basename(config))[0]
    outputs = ([osp.join(out_dir, f'{name}_fused_backbone.pth')] if backbone_only else
               [osp.join(out_dir, f'{name}_fused.pth'), osp.join(out_dir, f'{name}_fused.py')])
    existing = [p for p in outputs if osp.exists(p)]
    if existing and not force:
        raise FuseError(f'{existing[0]} already exists; pass --force to overwrite')
    cfg = load_config(config)
    try:
        ckpt = load_checkpoint_file(checkpoint)
    except CheckpointError as e:
        raise FuseError(str(e)) from None
    logger.info(f'[1/4] building {cfg.model.type} from {config}')
    model = build_model(cfg)
    n_layers = orepa_mm.count_reparam_layers(model)
    if n_layers == 0:
        raise FuseError(f'{config} builds no OREPA/DBB layer: nothing to fuse')
    logger.info(f'[2/4] loading {checkpoint}')
    load_training_checkpoint(model, ckpt, checkpoint)
    logger.info(f'[3/4] fusing {n_layers} re-param layers')
    fused = orepa_mm.fuse_model(model)
    summary: Dict[str, Any] = dict(layers_fused=n_layers, params_before=count_params(model),
                                   params_after=count_params(fused), outputs=outputs)
    # The deploy model must build from the deploy config and take the weights.
    dcfg = deploy_config(cfg)
    vanilla = _registry(cfg.default_scope).build(dcfg.model)
    missing, unexpected = vanilla.load_state_dict(fused.state_dict(), strict=False)
    if missing or unexpected:
        raise FuseError(f'internal error: fused weights do not fit the deploy config '
                        f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    if do_verify:
        batches, source = sample_batches(cfg, model)
        summary['max_rel_diff'] = verify(model, fused, batches)
        logger.info(f'verify on {len(batches)} samples ({source}): max |fused - unfused| / |out| = '
                    f'{summary["max_rel_diff"]:.2e}')
        if summary['max_rel_diff'] > VERIFY_TOL:
            raise FuseError(f'fused model differs from the unfused one by {summary["max_rel_diff"]:.2e} '
                            f'relative to the output (> {VERIFY_TOL}); nothing written')
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(ckpt.get('meta', {}) if isinstance(ckpt, dict) else {})
    meta = {k: v for k, v in meta.items() if k in ('dataset_meta', 'experiment_name', 'epoch', 'iter', 'seed')}
    meta.update(orepa_mm_fused=True, orepa_mm_version=orepa_mm.__version__,
                fused_from=dict(config=osp.abspath(config), checkpoint=osp.abspath(checkpoint)))
    logger.info(f'[4/4] writing {", ".join(outputs)}')
    if backbone_only:
        sd = {k[len('backbone.'):]: v for k, v in fused.state_dict().items() if k.startswith('backbone.')}
        _atomic_write(outputs[0], lambda p: torch.save(dict(state_dict=sd, meta=meta), p))
    else:
        _atomic_write(outputs[0], lambda p: torch.save(dict(state_dict=fused.state_dict(), meta=meta), p))
        _atomic_write(outputs[1], lambda p: dcfg.dump(p))
    if onnx:
        summary['onnx_max_rel_diff'] = export_onnx(fused, out_dir, name)
    logger.info(f'fused {n_layers} layers: parameters {summary["params_before"]:,} -> {summary["params_after"]:,}'
                + (f'; max relative difference {summary["max_rel_diff"]:.2e}' if do_verify else ''))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out_dir')
    parser.add_argument('--backbone-only', action='store_true', help='write only the fused backbone weights')
    parser.add_argument('--verify', action='store_true', help=f'compare fused vs unfused (fails above {VERIFY_TOL})')
    parser.add_argument('--onnx', action='store_true', help='export the fused backbone (+neck) to ONNX and check it')
    parser.add_argument('--force', action='store_true', help='overwrite existing outputs')
    args = parser.parse_args(argv)
    try:
        fuse_checkpoint(args.config, args.checkpoint, args.out_dir, args.backbone_only, args.verify,
                                  args.onnx, args.force)
    except FuseError as e:
        print(f'fuse_checkpoint: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
