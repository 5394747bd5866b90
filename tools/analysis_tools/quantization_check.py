"""INT8 post-training quantization of a fused model: what it costs on the
config's own evaluation, and which kernels predict trouble.

    python tools/analysis_tools/quantization_check.py CONFIG CHECKPOINT [--out-dir DIR] [--calib-batches N]
        [--calibration minmax|percentile|entropy ...] [--cfg-options KEY=VALUE ...]

CHECKPOINT is a training checkpoint of CONFIG (OREPA/DBB layers are fused
on the fly, a plain model is used as it is) or a fused deploy checkpoint
(``tools/fuse_checkpoint.py``).  The tool

1. evaluates the fused model in float32 with the config's test dataloader and
   evaluator (mmengine's Runner, the framework's metric);
2. exports the backbone and the neck (the parts re-parameterization changes)
   to ONNX and quantizes them with ONNX Runtime's static post-training
   quantization: QDQ format, per-channel symmetric INT8 weights, UINT8
   activations calibrated (min/max) on ``--calib-batches`` batches of the
   config's val dataloader;
3. evaluates again with the INT8 backbone and neck running in ONNX Runtime
   (the heads stay in float32 PyTorch, as in a mixed-precision deployment);
4. reports, for every conv of the backbone and neck, the weight statistics
   of :mod:`orepa_mm.quantization` (the outlier ratio of the worst output
   channel, the channels' range ratio, the per-channel INT8 weight error).

Why ONNX Runtime: it is the deployment runtime the fuse tool already exports
to, its QDQ models are what TensorRT consumes, and its calibration works on
any exported graph (PyTorch's own PTQ needs a traceable model and quantized
CPU kernels that mmcv's ops lack).

Writes ``quantization_check.json`` (metrics, drops, per-layer statistics),
``quantization_check.md`` and ``quantization_check.png`` (the statistics per
layer) into ``--out-dir``, and the ONNX models beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os.path as osp
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import DictAction

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import orepa_mm  # noqa: E402
from orepa_mm import compat  # noqa: E402
from orepa_mm.checkpoint import atomic_write, atomic_write_text, extract_state_dict, load_checkpoint_file  # noqa: E402
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, build_runner, log, tool_main  # noqa: E402
from orepa_mm.config import build_model, load_config  # noqa: E402
from orepa_mm.deploy import deploy_config  # noqa: E402
from orepa_mm.quantization import conv_weight_statistics  # noqa: E402

PROG = 'quantization_check'
#: ``--calibration`` choices: ONNX Runtime's calibration method and its options.
CALIBRATIONS = {'minmax': ('MinMax', {}), 'percentile': ('Percentile', {'CalibPercentile': 99.999}),
                'entropy': ('Entropy', {})}


class OnnxFeatures(nn.Module):
    """The backbone (+ neck) as an ONNX Runtime session: a batch tensor in, the feature maps out (a tuple)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        return tuple(torch.from_numpy(o).to(x.device) for o in outs)


class _PassThrough(nn.Module):
    """Stands in for the neck once the ONNX part has run it."""

    def forward(self, x):
        return x


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module, neck: Optional[nn.Module]) -> None:
        super().__init__()
        self.backbone, self.neck = backbone, neck

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        if self.neck is not None:
            out = self.neck(out)
        return tuple(out) if isinstance(out, (list, tuple)) else (out, )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', default=osp.join('work_dirs', 'quantization_check'))
    parser.add_argument('--calib-batches', type=int, default=16, help='val batches for calibration')
    parser.add_argument('--calibration', nargs='+', choices=list(CALIBRATIONS), default=['minmax'],
                        help='activation calibration method(s); each gets its INT8 model and evaluation')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config settings, key=value (as in mmdet/mmseg tools)')
    args = parser.parse_args(argv)
    if args.calib_batches < 1:
        raise ToolError('--calib-batches must be >= 1')
    for what, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            raise ToolError(f'{what} not found: {path}')
    return args


def fused_model(cfg, model: nn.Module, checkpoint: str) -> nn.Module:
    """``model`` with the training checkpoint loaded and fused, or the deploy
    model of ``cfg`` with the fused checkpoint loaded (eval mode)."""
    state = extract_state_dict(load_checkpoint_file(checkpoint), checkpoint)
    if set(state) == set(model.state_dict()):
        model.load_state_dict(state)
        return orepa_mm.fuse_model(model.eval())
    vanilla = build_model(cfg, deploy_config(cfg).model)
    own = vanilla.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ToolError(f'{checkpoint} fits neither {cfg.filename} nor its fused form: e.g. missing {missing[:2]}, '
                        f'unexpected {unexpected[:2]}, other shapes {wrong[:2]}')
    vanilla.load_state_dict(state)
    return vanilla.eval()


def calibration_inputs(runner, model: nn.Module, n: int) -> List[torch.Tensor]:
    """Preprocessed inputs of the first ``n`` batches of the val dataloader (the test one if none)."""
    from mmengine.utils import ProgressBar
    loader = runner.val_dataloader if runner._val_dataloader is not None else runner.test_dataloader
    inputs, bar = [], ProgressBar(n)
    with torch.no_grad():
        for batch in loader:
            if len(inputs) == n:
                break
            inputs.append(model.data_preprocessor(batch, False)['inputs'].float())
            bar.update()
    sys.stdout.write('\n')
    return inputs


def export(features: nn.Module, x: torch.Tensor, path: str) -> List[str]:
    """ONNX export with dynamic batch and image size; returns the output names."""
    with torch.no_grad():
        n_out = len(features(x))
    names = [f'feat{i}' for i in range(n_out)]
    axes = {name: {0: 'batch', 2: 'height', 3: 'width'} for name in ['input'] + names}

    def write(tmp: str) -> None:
        compat.onnx_export(features, (x, ), tmp, opset_version=17, input_names=['input'], output_names=names,
                           dynamic_axes=axes)
    try:
        atomic_write(path, write)
    except Exception as e:  # noqa: BLE001 - an operator ONNX lacks: the one thing to tell the user
        raise ToolError(f'the backbone/neck could not be exported to ONNX ({type(e).__name__}: '
                        f'{str(e).splitlines()[0][:160]}): this model is not supported') from e
    return names


def quantize(fp32_path: str, int8_path: str, inputs: List[torch.Tensor], calibration: str = 'minmax') -> None:
    from mmengine.utils import ProgressBar
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.todo = iter(inputs)
            self.bar = ProgressBar(len(inputs))

        def get_next(self):
            x = next(self.todo, None)
            if x is None:
                return None
            self.bar.update()
            return {'input': x.numpy()}

    method, options = CALIBRATIONS[calibration]
    if calibration != 'minmax' and len({tuple(x.shape) for x in inputs}) > 1:
        # ONNX Runtime's histogram calibrators stack each tensor over the calibration steps, which
        # must then have one shape: one image per step (a last batch may be short), padded with
        # zeros at the bottom and right to the largest size, as a detector's data preprocessor pads.
        h, w = max(x.shape[-2] for x in inputs), max(x.shape[-1] for x in inputs)
        inputs = [torch.nn.functional.pad(img[None], (0, w - img.shape[-1], 0, h - img.shape[-2]))
                  for x in inputs for img in x]

    def write(tmp: str) -> None:
        quantize_static(fp32_path, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method), extra_options=dict(options))
    atomic_write(int8_path, write)
    sys.stdout.write('\n')


def scalar_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The finite scalar metrics (numpy scalars included: mmseg rounds with numpy)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, numbers.Real) or (hasattr(value, 'ndim') and value.ndim == 0):
            value = float(value)
            if math.isfinite(value):
                out[key] = value
    return out


def markdown(report: Dict[str, Any]) -> str:
    methods = list(report['by_calibration'])
    lines = ['| metric | fp32 | ' + ' | '.join(f'INT8 ({m}) | drop ({m})' for m in methods) + ' |',
             '|---|---|' + '---|---|' * len(methods)]
    for key, fp32 in report['fp32'].items():
        cells = []
        for m in methods:
            int8 = report['by_calibration'][m]['int8'].get(key)
            cells += ['', ''] if int8 is None else [f'{int8:.4f}', f'{fp32 - int8:+.4f}']
        lines.append(f'| {key} | {fp32:.4f} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'ONNX Runtime vs PyTorch, float32 features: max relative difference '
              f'{report["onnx_fp32_max_rel_diff"]:.2e}', '',
              '| layer | shape | outlier ratio (worst channel) | channel range ratio | INT8 weight error |',
              '|---|---|---|---|---|']
    for r in sorted(report['layers'], key=lambda r: -r['int8_weight_error'])[:15]:
        lines.append(f'| {r["layer"]} | {"x".join(map(str, r["shape"]))} | {r["outlier_ratio"]:.1f} '
                     f'(channel {r["outlier_channel"]}) | {r["channel_range_ratio"]:.1f} | '
                     f'{r["int8_weight_error"]:.2e} |')
    return '\n'.join(lines) + '\n'


def plot(layers: List[Dict[str, Any]], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    x = range(1, len(layers) + 1)
    top.plot(x, [r['outlier_ratio'] for r in layers], marker='o', markersize=3, label='outlier ratio (worst channel)')
    top.plot(x, [r['channel_range_ratio'] for r in layers], marker='s', markersize=3, label='channel range ratio')
    top.set_yscale('log')
    top.legend()
    bottom.plot(x, [r['int8_weight_error'] for r in layers], marker='o', markersize=3, color='C3')
    bottom.set_ylabel('INT8 weight error')
    bottom.set_xlabel('conv (backbone, neck; module order)')
    top.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def quantization_check(config: str, checkpoint: str, out_dir: str, calib_batches: int = 16,
                       cfg_options: Optional[Dict[str, Any]] = None,
                       calibrations: Sequence[str] = ('minmax', )) -> Dict[str, Any]:
    """Run the check (see the module docstring); returns the report.  Its
    ``int8`` and ``drop`` are those of the first of ``calibrations``;
    ``by_calibration`` has each method's."""
    unknown = [c for c in calibrations if c not in CALIBRATIONS]
    if unknown or not calibrations:
        raise ToolError(f'unknown calibration {unknown}: choose from {", ".join(CALIBRATIONS)}')
    with warnings.catch_warnings():  # the frameworks' import-time deprecation warnings
        warnings.simplefilter('ignore')
        cfg = load_config(config, cfg_options)
    cfg.work_dir = osp.join(out_dir, 'runner')
    cfg.load_from, cfg.resume = None, False
    cfg.pop('custom_hooks', None)
    log(f'[1/5] building {cfg.model.type} and loading {checkpoint}')
    runner = build_runner(cfg, quiet_setup=True)
    model = fused_model(cfg, runner.model, checkpoint)
    if not hasattr(model, 'backbone') or not hasattr(model, 'extract_feat'):
        raise ToolError(f'{type(model).__name__} is not supported: the check quantizes a backbone (+ neck) '
                        'that extract_feat runs')
    runner.model = model
    neck = getattr(model, 'neck', None)
    features = _Features(model.backbone, neck).eval()
    layers = conv_weight_statistics(features)

    log('[2/5] evaluating in float32')
    fp32 = scalar_metrics(runner.test())
    log(f'[3/5] calibrating on {calib_batches} val batches and quantizing the backbone'
        f'{" and neck" if neck is not None else ""} to INT8 (ONNX Runtime, QDQ, per-channel)')
    inputs = calibration_inputs(runner, model, calib_batches)
    name = osp.splitext(osp.basename(config))[0]
    fp32_path = osp.join(out_dir, f'{name}_features_fp32.onnx')
    export(features, inputs[0], fp32_path)
    with torch.no_grad():
        ref, got = features(inputs[0]), OnnxFeatures(fp32_path)(inputs[0])
    onnx_gap = max(((r - g).abs().max() / r.abs().max().clamp_min(1e-12)).item() for r, g in zip(ref, got))

    by_calibration = {}
    for calibration in calibrations:
        int8_path = osp.join(out_dir, f'{name}_features_int8' + ('' if calibration == 'minmax' else
                                                                  f'-{calibration}') + '.onnx')
        log(f'[4/5] {calibration} calibration: quantizing, then evaluating with the INT8 backbone/neck in '
            'ONNX Runtime')
        quantize(fp32_path, int8_path, inputs, calibration)
        model.backbone = OnnxFeatures(int8_path)
        if neck is not None:
            model.neck = _PassThrough()
        try:
            int8 = scalar_metrics(runner.test())
        finally:
            model.backbone = features.backbone
            if neck is not None:
                model.neck = neck
        by_calibration[calibration] = dict(int8=int8, drop={k: fp32[k] - int8[k] for k in fp32 if k in int8})
    first = by_calibration[calibrations[0]]
    report = dict(config=osp.abspath(config), checkpoint=osp.abspath(checkpoint), calib_batches=calib_batches,
                  scheme='ONNX Runtime static PTQ, QDQ, per-channel symmetric INT8 weights, UINT8 activations '
                         f'({calibrations[0]} calibration); backbone and neck',
                  fp32=fp32, int8=first['int8'], drop=first['drop'], by_calibration=by_calibration,
                  onnx_fp32_max_rel_diff=onnx_gap, layers=layers,
                  worst_outlier_ratio=max(r['outlier_ratio'] for r in layers),
                  mean_int8_weight_error=sum(r['int8_weight_error'] for r in layers) / len(layers))
    log('[5/5] writing the report')
    atomic_write_text(osp.join(out_dir, 'quantization_check.json'), json.dumps(report, indent=1))
    table = markdown(report)
    atomic_write_text(osp.join(out_dir, 'quantization_check.md'), table)
    plot(layers, f'{name}: fused conv weights', osp.join(out_dir, 'quantization_check.png'))
    print(table)
    return report


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    quantization_check(args.config, args.checkpoint, args.out_dir, args.calib_batches, args.cfg_options,
                       args.calibration)
    log(f'wrote quantization_check.json, .md and .png in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
