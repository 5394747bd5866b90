"""Turn a training checkpoint of an OREPA/DBB model into a deploy checkpoint.

    python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR [--verify] [--onnx]
                                    [--backbone-only] [--force]

Builds the model from CONFIG, loads CHECKPOINT (weights-only), replaces every
OREPA/DBB layer anywhere in the model (backbone, neck, heads) by its plain
conv with ``orepa_mm.fuse_model_with_report`` and writes

* ``OUT_DIR/<name>_fused.pth``: an mmengine checkpoint (``state_dict`` and
  ``meta``, no optimizer state) that vanilla mmdet/mmseg/mmpretrain load;
* ``OUT_DIR/<name>_fused.py``: the deploy config, with every OREPA/DBB
  backbone and every re-param ``conv_cfg`` (backbone, neck, heads) replaced
  by the vanilla one, no ``orepa_mm`` import and no pretrained
  initialisation;

or, with ``--backbone-only``, ``OUT_DIR/<name>_fused_backbone.pth``: the
fused backbone's weights in the vanilla backbone's key layout (usable as
``init_cfg=dict(type='Pretrained', checkpoint=...)``).

``--verify`` compares the training-time and the fused model in eval mode on
samples of the config's test set (random input if it cannot be loaded) and
exits non-zero when the largest relative difference exceeds 1e-5.
``--onnx`` exports what it can of the fused model: the backbone, backbone +
neck, and backbone + neck + the dense head (mmdet's single-stage and RPN
heads, mmseg's decode head, mmpretrain's classifier head) up to their raw
outputs (the logits for a classifier); each export is checked
with onnxruntime against PyTorch, and the tool says what it left out (the
parts that failed to export, RoI heads, auxiliary heads, post-processing).

A DBB layer fuses into a conv with a bias; where no BatchNorm follows it to
absorb that bias (e.g. a conv followed by GroupNorm in a head), the fused
conv keeps it and the tool names those layers: the deploy config must build
them with ``bias=True`` (nothing else changes), which it says in a warning
and in the summary (``biased_convs``).
"""
from __future__ import annotations

import argparse
import copy
import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import DictAction

import orepa_mm
from orepa_mm import compat
from orepa_mm.checkpoint import atomic_write, extract_state_dict, load_checkpoint_file, save_atomic
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, log, tool_main
from orepa_mm.config import build_model, load_config
from orepa_mm.deploy import deploy_config, max_relative_gap, model_outputs, reparam_conv_cfgs

VERIFY_TOL = 1e-5


class FuseError(ToolError):
    """Bad input; the message says what is wrong."""


def load_training_checkpoint(model: nn.Module, vanilla: nn.Module, ckpt: Any, path: str) -> None:
    """Load strictly into ``model``; explain an already-fused (``vanilla``
    layout) or mismatched checkpoint."""
    sd = extract_state_dict(ckpt, path)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    model_keys, vanilla_keys = set(model.state_dict()), set(vanilla.state_dict())
    if (isinstance(meta, dict) and meta.get('orepa_mm_fused')) or (set(sd) == vanilla_keys != model_keys):
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


def sample_batches(cfg, model: nn.Module, n: int = 2) -> Tuple[List[Any], str]:
    """Preprocessed batches from the config's test pipeline, else random input."""
    try:
        from mmengine.runner import Runner
        loader_cfg = copy.deepcopy(cfg.test_dataloader)
        loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
        batches = []
        for i, batch in enumerate(Runner.build_dataloader(loader_cfg)):
            if i >= n:
                break
            batches.append(model.data_preprocessor(batch, False))
        if batches:
            return batches, 'test set'
    except Exception as e:  # no dataset on this machine: fall back to noise
        log(f'test data unavailable ({type(e).__name__}: {str(e)[:80]}); using random input')
    torch.manual_seed(0)
    return [dict(inputs=torch.randn(1, 3, 256, 256), data_samples=None) for _ in range(n)], 'random input'


class _Chain(nn.Module):
    """Backbone, then optionally a neck and a head, on one image batch: the
    raw outputs of the last part, as a flat tuple of tensors."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        for part in self.parts:
            x = part(x)
        return tuple(_flat(x))


def _flat(obj: Any) -> List[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat(o)]
    return []


#: Heads that run on the (neck's) features alone, by attribute name
#: (``head``: mmpretrain's classifier head, features to logits).
DENSE_HEADS = ('bbox_head', 'decode_head', 'rpn_head', 'head')
#: Parts an export never holds, and why.
NOT_EXPORTED = {'roi_head': 'needs proposals and RoI ops', 'auxiliary_head': 'training only',
                'mask_head': 'needs RoIs'}


def onnx_parts(fused: nn.Module) -> Tuple[Dict[str, nn.Module], List[str]]:
    """What :func:`export_onnx` tries to export (name -> module, longest
    last) and what it leaves out by design (one line each)."""
    backbone = fused.backbone
    neck = getattr(fused, 'neck', None)
    chain = [backbone] + ([neck] if neck is not None else [])
    parts: Dict[str, nn.Module] = {'backbone': _Chain(backbone)}
    if neck is not None:
        parts['backbone_neck'] = _Chain(*chain)
    head_name = next((h for h in DENSE_HEADS if getattr(fused, h, None) is not None), None)
    if head_name is not None:
        parts[f'backbone_{"neck_" if neck is not None else ""}{head_name}'] = _Chain(*chain, getattr(fused, head_name))
    left_out = [f'{name} ({why})' for name, why in NOT_EXPORTED.items() if getattr(fused, name, None) is not None]
    left_out.append('post-processing (box decoding and NMS, resizing to the image, or the classifier\'s softmax): '
                    'not part of the raw outputs')
    return parts, left_out


def export_onnx(fused: nn.Module, out_dir: str, name: str,
                input_shape=(1, 3, 288, 288)) -> Tuple[Dict[str, float], List[str]]:
    """Export what :func:`onnx_parts` names and compare onnxruntime with torch.

    Returns ``{part: max relative difference}`` for the exported parts and
    the list of what is left out (by design, or because its export failed),
    each with the reason.
    """
    import onnxruntime as ort

    parts, left_out = onnx_parts(fused)
    x = torch.randn(*input_shape)
    errors: Dict[str, float] = {}
    for part, module in parts.items():
        module.eval()
        path = osp.join(out_dir, f'{name}_fused_{part}.onnx')
        ref = model_outputs(module, dict(inputs=x))

        def write(tmp: str, module=module) -> None:
            compat.onnx_export(module, (x,), tmp, opset_version=17)
        try:
            atomic_write(path, write)
        except Exception as e:  # noqa: BLE001 - an operator ONNX lacks: report and go on
            left_out.append(f'{part} (export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})')
            continue
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        errors[part] = max((r - torch.from_numpy(g)).abs().max().item() / (r.abs().max().item() or 1.0)
                           for r, g in zip(ref, got))
        log(f'ONNX {part}: {path} (onnxruntime vs torch, max rel. diff {errors[part]:.2e})')
    for line in left_out:
        log(f'ONNX left out: {line}')
    return errors, left_out


def fuse_checkpoint(config: str, checkpoint: str, out_dir: str, backbone_only: bool = False,
                    do_verify: bool = False, onnx: bool = False, force: bool = False,
                    cfg_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fuse ``checkpoint`` of ``config`` (with ``cfg_options`` merged, as
    ``--cfg-options`` does) into ``out_dir`` (see the module docstring); returns a summary."""
    name = osp.splitext(osp.basename(config))[0]
    outputs = ([osp.join(out_dir, f'{name}_fused_backbone.pth')] if backbone_only else
               [osp.join(out_dir, f'{name}_fused.pth'), osp.join(out_dir, f'{name}_fused.py')])
    existing = [p for p in outputs if osp.exists(p)]
    if existing and not force:
        raise FuseError(f'{existing[0]} already exists; pass --force to overwrite')
    cfg = load_config(config, cfg_options)
    ckpt = load_checkpoint_file(checkpoint)
    log(f'[1/4] building {cfg.model.type} from {config}')
    model = build_model(cfg)
    n_layers = orepa_mm.count_reparam_layers(model)
    if n_layers == 0:
        raise FuseError(f'{config} builds no OREPA/DBB layer: nothing to fuse')
    # The deploy model must build from the deploy config; its keys also tell
    # an already-fused checkpoint apart.
    dcfg = deploy_config(cfg)
    left = reparam_conv_cfgs(dcfg.model)
    if left:
        raise RuntimeError(f'the deploy config still has re-param conv configs at {left}')
    vanilla = build_model(cfg, dcfg.model)
    log(f'[2/4] loading {checkpoint}')
    load_training_checkpoint(model, vanilla, ckpt, checkpoint)
    log(f'[3/4] fusing {n_layers} re-param layers')
    report = orepa_mm.fuse_model_with_report(model)
    fused = report.model
    missing, unexpected = vanilla.load_state_dict(fused.state_dict(), strict=False)
    # A conv listed in biased_convs carries a bias the deploy config does not build.
    unexpected = [k for k in unexpected if k not in {f'{c}.bias' for c in report.biased_convs}]
    if missing or unexpected:
        raise RuntimeError(f'fused weights do not fit the deploy config (missing {missing[:3]}, '
                           f'unexpected {unexpected[:3]})')
    if report.biased_convs:
        log(f'WARNING: {len(report.biased_convs)} fused conv(s) keep a bias because no BatchNorm follows them '
            f'to absorb it; build them with bias=True in the deploy config: {", ".join(report.biased_convs)}')
    summary: Dict[str, Any] = dict(layers_fused=n_layers, params_before=count_params(model),
                                   params_after=count_params(fused), outputs=outputs,
                                   biased_convs=list(report.biased_convs))
    if do_verify:
        batches, source = sample_batches(cfg, model)
        summary['max_rel_diff'] = max_relative_gap(model, fused, batches)
        log(f'verify on {len(batches)} samples ({source}): max |fused - unfused| / |out| = '
            f'{summary["max_rel_diff"]:.2e}')
        if summary['max_rel_diff'] > VERIFY_TOL:
            raise FuseError(f'fused model differs from the unfused one by {summary["max_rel_diff"]:.2e} '
                            f'relative to the output (> {VERIFY_TOL}); nothing written')
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(ckpt.get('meta', {}) if isinstance(ckpt, dict) else {})
    meta = {k: v for k, v in meta.items() if k in ('dataset_meta', 'experiment_name', 'epoch', 'iter', 'seed')}
    meta.update(orepa_mm_fused=True, orepa_mm_version=orepa_mm.__version__,
                fused_from=dict(config=osp.abspath(config), checkpoint=osp.abspath(checkpoint)))
    log(f'[4/4] writing {", ".join(outputs)}')
    state = fused.state_dict()
    if backbone_only:
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    save_atomic(dict(state_dict=state, meta=meta), outputs[0])
    if not backbone_only:
        atomic_write(outputs[1], dcfg.dump)  # the suffix tells mmengine to write Python
    if onnx:
        summary['onnx_max_rel_diff'], summary['onnx_left_out'] = export_onnx(fused, out_dir, name)
    log(f'fused {n_layers} layers: parameters {summary["params_before"]:,} -> {summary["params_after"]:,}'
        + (f'; max relative difference {summary["max_rel_diff"]:.2e}' if do_verify else ''))
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out_dir')
    parser.add_argument('--backbone-only', action='store_true', help='write only the fused backbone weights')
    parser.add_argument('--verify', action='store_true', help=f'compare fused vs unfused (fails above {VERIFY_TOL})')
    parser.add_argument('--onnx', action='store_true',
                        help='export the fused backbone, + neck, + dense head to ONNX, check them, '
                             'say what is left out')
    parser.add_argument('--force', action='store_true', help='overwrite existing outputs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override settings of CONFIG, as in mmdet/mmseg\'s tools (key=value)')
    return parser.parse_args(argv)


@tool_main('fuse_checkpoint')
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    fuse_checkpoint(args.config, args.checkpoint, args.out_dir, args.backbone_only, args.verify, args.onnx,
                    args.force, args.cfg_options)


if __name__ == '__main__':
    raise SystemExit(main())
