"""From a training checkpoint of an OREPA/DBB model to a deployed model, with mmdeploy.

    python tools/deploy.py CONFIG CHECKPOINT OUT_DIR [--backend onnxruntime]
                           [--shape dynamic|static] [--deploy-cfg FILE] [--img IMAGE]
                           [--device cpu] [--verify] [--force]
                           [--cfg-options KEY=VALUE ...]

1. Fuses CHECKPOINT as ``tools/fuse_checkpoint.py`` does, into
   ``OUT_DIR/fused/`` (the deploy checkpoint and its vanilla config).
2. Runs mmdeploy's pipeline on the fused model: ``torch2onnx`` writes
   ``OUT_DIR/end2end.onnx``, and for a TensorRT backend ``onnx2tensorrt``
   writes ``OUT_DIR/end2end.engine`` (after INT8 calibration on the config's
   validation images for ``tensorrt-int8``).  The ONNX export uses the
   TorchScript exporter, which mmdeploy's rewriters are made for, on every
   torch (``orepa_mm.compat.torchscript_onnx_exporter``).
3. With ``--verify``: runs the deployed model on one test batch and on the
   whole test set through mmdeploy's task processor, and the fused PyTorch
   model through mmengine's Runner, then prints their raw outputs' largest
   difference and their metrics side by side.

The deploy config comes from ``configs/deploy/`` by the model's framework
(mmdet: detection, mmseg: segmentation, mmpretrain: classification), the
backend and the shape, unless ``--deploy-cfg`` names one.  ``OUT_DIR/deploy.json``
holds the summary.  Needs mmdeploy (``pip install -e .[deploy]``; see the
README); nothing in OUT_DIR is overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import numbers
import os
import os.path as osp
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling tool, run as a script or imported
from fuse_checkpoint import fuse_checkpoint  # noqa: E402

from orepa_mm import compat  # noqa: E402
from orepa_mm.checkpoint import atomic_write_text  # noqa: E402
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, build_runner, log, quietly_built, tool_main  # noqa: E402
from orepa_mm.config import load_config  # noqa: E402

DEPLOY_CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'deploy')
#: The mmdeploy task of each framework, as the deploy configs are named.
TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation', 'mmpretrain': 'classification'}
BACKENDS = ('onnxruntime', 'tensorrt-fp16', 'tensorrt-int8')


class DeployError(ToolError):
    """Bad input or a missing part; the message says what is wrong."""


def check_backend(backend: str, device: str) -> None:
    """Raise :class:`DeployError` unless mmdeploy and ``backend`` can run here."""
    try:
        import mmdeploy  # noqa: F401
    except ImportError:
        raise DeployError("mmdeploy is not installed: pip install -e '.[deploy]' (mmdeploy 1.3.1 and what it "
                          'imports; the README says how to keep its protobuf pin from moving onnx)') from None
    if backend == 'onnxruntime':
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DeployError('the onnxruntime backend is not installed: pip install onnxruntime') from None
        return
    if not torch.cuda.is_available():
        raise DeployError(f'{backend} needs an NVIDIA GPU and this machine has none (torch.cuda.is_available() '
                          'is False): deploy with --backend onnxruntime here, or run on a GPU machine')
    if not device.startswith('cuda'):
        raise DeployError(f'{backend} runs on the GPU: pass --device cuda:0')
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise DeployError(f'{backend}: TensorRT is not installed (pip install tensorrt, matching mmdeploy\'s '
                          'TensorRT ops)') from None


def find_deploy_config(task: str, backend: str, shape: Optional[str]) -> str:
    """The file of ``configs/deploy/`` for ``task``, ``backend`` and ``shape``
    (None: dynamic where there is one, else static)."""
    shapes = [shape] if shape else ['dynamic', 'static']
    for s in shapes:
        found = sorted(glob.glob(osp.join(DEPLOY_CONFIGS, f'{task}_{backend}_{s}*.py')))
        if found:
            return found[0]
    have = sorted(osp.basename(p) for p in glob.glob(osp.join(DEPLOY_CONFIGS, f'{task}_*.py')))
    raise DeployError(f'configs/deploy has no {task} config for {backend} with {shape or "any"} shape '
                      f'(it has {", ".join(have)}); pass one with --deploy-cfg')


def first_test_image(cfg) -> str:
    """The first image of ``cfg``'s test set: what the export traces."""
    from mmengine.registry import DATASETS
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    if hasattr(dataset, 'full_init'):
        dataset.full_init()
    if len(dataset) == 0:
        raise DeployError('the config\'s test set is empty: pass an image with --img')
    return dataset.get_data_info(0)['img_path']


def export(deploy_cfg: str, model_cfg: str, checkpoint: str, img: str, work_dir: str, backend: str,
           device: str) -> List[str]:
    """mmdeploy's pipeline into ``work_dir``; the backend files it wrote."""
    from mmdeploy.apis import torch2onnx
    from mmdeploy.utils import get_ir_config
    from mmdeploy.utils import load_config as mmdeploy_load_config

    from orepa_mm import mmdeploy_rewrites
    mmdeploy_rewrites.register()
    dcfg, mcfg = mmdeploy_load_config(deploy_cfg, model_cfg)
    onnx_file = get_ir_config(dcfg)['save_file']
    log(f'[2/3] torch2onnx with {osp.relpath(deploy_cfg)} (TorchScript exporter)')
    try:
        with compat.torchscript_onnx_exporter():
            torch2onnx(img, work_dir, onnx_file, dcfg, mcfg, checkpoint, device)
    except Exception as e:  # mmdeploy's failures are many kinds of exceptions: say which model and why
        raise DeployError(f'mmdeploy could not export {mcfg.model.type} to ONNX: {type(e).__name__}: '
                          f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}') from e
    files = [osp.join(work_dir, onnx_file)]
    if backend.startswith('tensorrt'):
        files = _onnx2tensorrt(dcfg, mcfg, checkpoint, files[0], work_dir, device)
    return files


def _onnx2tensorrt(dcfg, mcfg, checkpoint: str, onnx_path: str, work_dir: str, device: str) -> List[str]:
    from mmdeploy.apis import create_calib_input_data
    from mmdeploy.apis.tensorrt import onnx2tensorrt
    from mmdeploy.utils import get_calib_filename, get_model_inputs
    calib = get_calib_filename(dcfg)
    if calib is not None:
        log(f'[2/3] INT8 calibration data from the validation set -> {calib}')
        create_calib_input_data(osp.join(work_dir, calib), dcfg, mcfg, checkpoint, dataset_cfg=None,
                                dataset_type='val', device=device)
    engines = []
    for model_id, _ in enumerate(get_model_inputs(dcfg)):
        name = osp.splitext(osp.basename(onnx_path))[0] + '.engine'
        log(f'[2/3] onnx2tensorrt -> {name}')
        onnx2tensorrt(work_dir, name, model_id, dcfg, onnx_path, device=device)
        engines.append(osp.join(work_dir, name))
    return engines


def compare_graph(processor, dcfg, checkpoint: str, img: str, backend_model) -> Dict[str, float]:
    """The deployed graph against the PyTorch code it was exported from, on ``img``.

    The fused model is patched with mmdeploy's rewrites (its post-processing
    included) and run in PyTorch under its rewriter context, as the export
    traced it; the backend runs the same input.  Per output: the largest
    relative difference (floating point) or the fraction of elements that
    differ (labels)."""
    from mmdeploy.core import RewriterContext, patch_model
    from mmdeploy.utils import IR, get_backend, get_input_shape, get_ir_config
    model = processor.build_pytorch_model(checkpoint)
    data, inputs = processor.create_input(img, get_input_shape(dcfg),
                                          data_preprocessor=getattr(model, 'data_preprocessor', None))
    inputs = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    backend = get_backend(dcfg).value
    opset = get_ir_config(dcfg).get('opset_version', 11)
    patched = patch_model(model, cfg=dcfg, backend=backend, ir=IR.ONNX)
    with RewriterContext(cfg=dcfg, backend=backend, opset=opset), torch.no_grad():
        ours = patched.forward(inputs, data_samples=data['data_samples'], mode='predict')
    ours = [ours] if isinstance(ours, torch.Tensor) else list(ours)
    names = get_ir_config(dcfg)['output_names']
    with torch.no_grad():
        theirs = backend_model.wrapper({get_ir_config(dcfg)['input_names'][0]: inputs})
    gaps = {}
    for name, a in zip(names, ours):
        a, b = a.detach().cpu(), theirs[name].detach().cpu()
        if a.shape != b.shape:
            raise DeployError(f'the deployed graph\'s {name} has shape {tuple(b.shape)}, PyTorch\'s {tuple(a.shape)}')
        if a.is_floating_point():
            gaps[name] = ((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-12)).item()
        else:
            gaps[name] = (a != b).double().mean().item() if a.numel() else 0.0
    return gaps


def _prediction_tensors(sample) -> Dict[str, torch.Tensor]:
    if 'pred_instances' in sample:  # detection: by descending score
        inst = sample.pred_instances
        order = inst.scores.argsort(descending=True, stable=True)
        return dict(bboxes=inst.bboxes[order], scores=inst.scores[order], labels=inst.labels[order])
    if 'pred_sem_seg' in sample:
        return dict(labels=sample.pred_sem_seg.data)
    return dict(scores=sample.pred_score)


def compare_predictions(ours: Sequence[Any], theirs: Sequence[Any]) -> Dict[str, float]:
    """The deployed model's predictions (``theirs``) against the fused PyTorch
    model's (``ours``) on the same batch, as the evaluator sees them: per
    quantity the largest relative difference (floating point) or the
    fraction of labels that differ, and the number of images whose
    prediction counts differ."""
    gaps: Dict[str, float] = {'images_with_other_counts': 0}
    for a, b in zip(ours, theirs):
        ta, tb = _prediction_tensors(a), _prediction_tensors(b)
        for key, x in ta.items():
            x, y = x.detach().cpu(), tb[key].detach().cpu()
            if x.shape != y.shape:
                gaps['images_with_other_counts'] += 1
                n = min(len(x), len(y))
                x, y = x[:n], y[:n]
            if x.is_floating_point():
                gap = ((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-12)).item()
            else:
                gap = (x != y).double().mean().item() if x.numel() else 0.0
            gaps[key] = max(gaps.get(key, 0.0), gap)
    return gaps


def verify(model_cfg: str, fused_ckpt: str, deploy_cfg: str, backend_files: List[str], work_dir: str,
           device: str, img: str) -> Dict[str, Any]:
    """The deployed graph against PyTorch on ``img``; the deployed model's
    predictions on one test batch and its test-set metrics beside the fused
    PyTorch model's."""
    from mmdeploy.apis.utils import build_task_processor
    from mmdeploy.utils import is_dynamic_batch
    from mmdeploy.utils import load_config as mmdeploy_load_config
    dcfg, mcfg = mmdeploy_load_config(deploy_cfg, model_cfg)
    cfg = load_config(model_cfg)
    if not is_dynamic_batch(dcfg):  # a graph exported for one image: both models evaluate one at a time
        mcfg.test_dataloader.batch_size = cfg.test_dataloader.batch_size = 1
    processor = build_task_processor(mcfg, dcfg, device)
    backend_model = processor.build_backend_model(backend_files, processor.update_data_preprocessor)
    graph = compare_graph(processor, dcfg, fused_ckpt, img, backend_model)
    log('[3/3] the deployed graph against the PyTorch code it was exported from, on one image: '
        + ', '.join(f'{k} {v:.2e}' for k, v in graph.items()))
    log('[3/3] the fused PyTorch model on the test set')
    cfg.load_from = fused_ckpt
    cfg.work_dir = osp.join(work_dir, 'verify_pytorch')
    runner = build_runner(cfg, quiet_setup=True)
    pytorch_metrics = runner.test()  # leaves the model in eval mode
    batch = next(iter(runner.test_dataloader))
    with torch.no_grad():  # each on its own copy: the frameworks write predictions into the batch's samples
        predictions = compare_predictions(runner.model.test_step(copy.deepcopy(batch)),
                                          backend_model.test_step(copy.deepcopy(batch)))
    log('[3/3] the deployed model on the test set (mmdeploy\'s task processor)')
    deployed_metrics = quietly_built(
        lambda: processor.build_test_runner(backend_model, osp.join(work_dir, 'verify_deployed'))).test()
    return dict(pytorch=_plain(pytorch_metrics), deployed=_plain(deployed_metrics), graph=graph,
                predictions=predictions)


def _plain(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}  # numpy's too


def metric_table(result: Dict[str, Any], backend: str) -> str:
    """Markdown table of the metrics: fused PyTorch beside the deployed model."""
    rows = [f'| metric | fused PyTorch | {backend} | difference |', '|---|---|---|---|']
    for key, ours in result['pytorch'].items():
        theirs = result['deployed'].get(key)
        if theirs is not None:
            rows.append(f'| {key} | {ours:.4f} | {theirs:.4f} | {theirs - ours:+.4f} |')
    rows.append('\nrelative difference (labels: the fraction differing)')
    rows.append('- the graph against the PyTorch code it was exported from, one image: '
                + ', '.join(f'{k} {v:.2e}' for k, v in result['graph'].items()))
    rows.append('- the deployed predictions against the fused PyTorch model\'s, one test batch: '
                + ', '.join(f'{k} {v:.2e}' if isinstance(v, float) else f'{k} {v}'
                            for k, v in result['predictions'].items()))
    return '\n'.join(rows)


def deploy(config: str, checkpoint: str, out_dir: str, backend: str = 'onnxruntime', shape: Optional[str] = None,
           deploy_cfg: Optional[str] = None, img: Optional[str] = None, device: str = 'cpu',
           do_verify: bool = False, force: bool = False, cfg_options: Optional[Dict[str, Any]] = None
           ) -> Dict[str, Any]:
    """Fuse, export and (``do_verify``) check; see the module docstring. Returns the summary."""
    check_backend(backend, device)
    cfg = load_config(config, cfg_options)
    task = TASKS[cfg.default_scope]
    deploy_cfg = deploy_cfg or find_deploy_config(task, backend, shape)
    if not osp.isfile(deploy_cfg):
        raise DeployError(f'deploy config {deploy_cfg} does not exist')
    codebase = Config.fromfile(deploy_cfg).get('codebase_config', {}).get('type')
    if codebase != cfg.default_scope:
        raise DeployError(f'deploy config {deploy_cfg} is for {codebase} models and {config} builds a '
                          f'{cfg.default_scope} model')
    summary_path = osp.join(out_dir, 'deploy.json')
    if osp.exists(summary_path) and not force:
        raise DeployError(f'{summary_path} already exists; pass --force to overwrite')
    if img is not None and not osp.isfile(img):
        raise DeployError(f'image {img} does not exist')
    log(f'[1/3] fusing {checkpoint}')
    fused = fuse_checkpoint(config, checkpoint, osp.join(out_dir, 'fused'), force=force, cfg_options=cfg_options)
    fused_ckpt, fused_cfg = fused['outputs']
    img = img or first_test_image(cfg)
    # mmdeploy writes into a staging folder; its files replace OUT_DIR's at the end.
    stage = tempfile.mkdtemp(prefix='.deploy-', dir=out_dir)
    try:
        files = export(deploy_cfg, fused_cfg, fused_ckpt, img, stage, backend, device)
        outputs = []
        for f in files:
            outputs.append(osp.join(out_dir, osp.basename(f)))
            os.replace(f, outputs[-1])
        summary: Dict[str, Any] = dict(config=osp.abspath(config), checkpoint=osp.abspath(checkpoint),
                                       deploy_cfg=osp.abspath(deploy_cfg), backend=backend,
                                       fused=[fused_ckpt, fused_cfg], backend_files=outputs,
                                       layers_fused=fused['layers_fused'])
        if do_verify:
            summary['verify'] = verify(fused_cfg, fused_ckpt, deploy_cfg, outputs, stage, device, img)
            print(metric_table(summary['verify'], backend))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    log(f'deployed {osp.basename(config)} to {backend}: {", ".join(outputs)}')
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the training config (OREPA/DBB model)')
    parser.add_argument('checkpoint', help='its training checkpoint')
    parser.add_argument('out_dir')
    parser.add_argument('--backend', choices=BACKENDS, default='onnxruntime')
    parser.add_argument('--shape', choices=('dynamic', 'static'), default=None,
                        help='input shape of the exported graph (default: dynamic where configs/deploy has it)')
    parser.add_argument('--deploy-cfg', default=None, help='an mmdeploy deploy config instead of configs/deploy\'s')
    parser.add_argument('--img', default=None, help='the image the export traces (default: the first test image)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--verify', action='store_true',
                        help='evaluate the deployed and the fused PyTorch model on the test set and compare')
    parser.add_argument('--force', action='store_true', help='overwrite existing outputs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override settings of CONFIG, as in mmdet/mmseg\'s tools (key=value)')
    return parser.parse_args(argv)


@tool_main('deploy')
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    deploy(args.config, args.checkpoint, args.out_dir, args.backend, args.shape, args.deploy_cfg, args.img,
           args.device, args.verify, args.force, args.cfg_options)


if __name__ == '__main__':
    raise SystemExit(main())
