"""Deployment with mmdeploy: ``tools/deploy.py`` from a training checkpoint to an
ONNX Runtime model, for the toy FCOS, Faster R-CNN (its RoI head through
mmdeploy's rewrites), PSPNet and classifier, each checked against the fused
PyTorch model: the test-set metrics, the predictions on one test batch and
the exported graph's raw outputs on one image (``--verify``, read back from
``deploy.json``).  Then the tool's errors, one message each.

Needs mmdeploy (``pip install --no-deps mmdeploy==1.3.1`` and
requirements/deploy.txt, which scripts/setup.sh installs).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import CLS_CFG, DET_CFG, DET_KEEP_ALL, ROOT, SEG_CFG, bin_path, once_per_run, run

pytestmark = pytest.mark.slow
pytest.importorskip('mmdeploy', reason="mmdeploy is not installed (pip install --no-deps mmdeploy==1.3.1 and "
                                       "-r requirements/deploy.txt)")

FCOS_CFG = ROOT / 'configs/toy/fcos_r18w32-orepa_fpn_600i_toy-coco.py'
FCOS_ITERS = 40
TOOL = str(ROOT / 'tools/deploy.py')
#: Floating-point outputs of the deployed model against PyTorch's (relative).
RTOL = 1e-5


@pytest.fixture(scope='session')
def fcos_ckpt(toy_root: Path, tmp_path_factory) -> Path:
    """The toy OREPA FCOS (the demo's detector) trained for a few iterations."""
    def train(_) -> Path:
        work = toy_root / 'work_fcos_deploy'
        run([bin_path('mim'), 'train', 'mmdet', str(FCOS_CFG), '--work-dir', str(work), '--cfg-options',
             f'train_cfg.max_iters={FCOS_ITERS}', f'train_cfg.val_interval={FCOS_ITERS}',
             f'default_hooks.checkpoint.interval={FCOS_ITERS}'], cwd=toy_root)
        return work / f'iter_{FCOS_ITERS}.pth'
    return once_per_run(tmp_path_factory, 'fcos_deploy', train)


def deploy(cfg: Path, ckpt: Path, out: Path, cwd: Path, *extra: str, check: bool = True):
    return run([sys.executable, TOOL, str(cfg), str(ckpt), str(out)] + list(extra), cwd=cwd, check=check,
               env={'OMP_NUM_THREADS': '1'})


def verified(cfg: Path, ckpt: Path, out: Path, cwd: Path, *extra: str) -> dict:
    proc = deploy(cfg, ckpt, out, cwd, '--verify', *extra)
    assert '| metric | fused PyTorch | onnxruntime |' in proc.stdout, proc.stdout[-2000:]
    assert (out / 'end2end.onnx').is_file() and len(list((out / 'fused').glob('*_fused.*'))) == 2
    assert not list(out.glob('.deploy-*')), 'the staging folder was left behind'
    return json.loads((out / 'deploy.json').read_text())['verify']


def _close(summary: dict, floats: List[str]) -> None:
    pred, graph = summary['predictions'], summary['graph']
    assert pred['images_with_other_counts'] == 0, pred
    for key in floats:
        assert pred[key] <= RTOL, (key, pred)
    assert pred.get('labels', 0.0) == 0.0, pred
    for name, gap in graph.items():
        assert gap <= (RTOL if name != 'labels' else 0.0), (name, graph)


def _same_metrics(summary: dict, keys: List[str], tol: float) -> None:
    for key in keys:
        ours, theirs = summary['pytorch'][key], summary['deployed'][key]
        assert abs(ours - theirs) <= tol, (key, ours, theirs)


def test_fcos_deploys_to_onnxruntime_with_the_fused_models_metrics(fcos_ckpt, toy_root, tmp_path):
    summary = verified(FCOS_CFG, fcos_ckpt, tmp_path / 'fcos', toy_root)
    _same_metrics(summary, ['coco/bbox_mAP', 'coco/bbox_mAP_50'], 1e-3)
    _close(summary, ['bboxes', 'scores'])


def test_faster_rcnn_deploys_with_mmdets_proposals_and_per_class_boxes(det_run, toy_root, tmp_path):
    """Every detection kept (score_thr 0): the deployed RPN and RoI head must
    give mmdet's boxes, scores and labels, not only a close mAP."""
    summary = verified(DET_CFG, det_run['ckpt'], tmp_path / 'frcnn', toy_root, '--cfg-options', *DET_KEEP_ALL)
    _same_metrics(summary, ['coco/bbox_mAP', 'coco/bbox_mAP_50'], 1e-3)
    _close(summary, ['bboxes', 'scores'])


def test_pspnet_deploys_with_exact_pyramid_pooling(seg_run, toy_root, tmp_path):
    summary = verified(SEG_CFG, seg_run['ckpt'], tmp_path / 'pspnet', toy_root)
    assert summary['pytorch']['mIoU'] > 0
    _same_metrics(summary, ['mIoU'], 0.05)
    _close(summary, [])


@pytest.mark.parametrize('shape', ['dynamic', 'static'])
def test_classifier_deploys_with_the_same_top1(shape, cls_run, toy_root, tmp_path):
    summary = verified(CLS_CFG, cls_run['ckpt'], tmp_path / shape, toy_root, '--shape', shape)
    _same_metrics(summary, ['accuracy/top1'], 0.0)
    _close(summary, ['scores'])


# -- errors: one message each, exit status 2 ---------------------------------------------
def _error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith('deploy: error:')]
    assert len(lines) == 1, proc.stderr[-1500:]
    return lines[0]


def test_error_without_mmdeploy(cls_run, toy_root, tmp_path):
    block = tmp_path / 'block'
    block.mkdir()
    (block / 'sitecustomize.py').write_text(
        'import importlib.abc, sys\n'
        'class _Block(importlib.abc.MetaPathFinder):\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name == 'mmdeploy' or name.startswith('mmdeploy.'):\n"
        "            raise ModuleNotFoundError('mmdeploy is blocked in this process')\n"
        'sys.meta_path.insert(0, _Block())\n')
    proc = run([sys.executable, TOOL, str(CLS_CFG), str(cls_run['ckpt']), str(tmp_path / 'out')], cwd=toy_root,
               env={'PYTHONPATH': str(block)}, check=False)
    assert 'mmdeploy is not installed' in _error(proc)
    assert not (tmp_path / 'out').exists(), 'nothing is written when the check fails'


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_error_tensorrt_without_a_gpu(cls_run, toy_root, tmp_path):
    proc = deploy(CLS_CFG, cls_run['ckpt'], tmp_path / 'out', toy_root, '--backend', 'tensorrt-fp16', check=False)
    assert 'needs an NVIDIA GPU and this machine has none' in _error(proc)


def test_error_a_deploy_config_for_another_framework(cls_run, toy_root, tmp_path):
    proc = deploy(CLS_CFG, cls_run['ckpt'], tmp_path / 'out', toy_root, '--deploy-cfg',
                  str(ROOT / 'configs/deploy/segmentation_onnxruntime_dynamic.py'), check=False)
    assert 'is for mmseg models' in _error(proc)


def test_error_a_model_mmdeploy_cannot_export(cls_run, toy_root, tmp_path):
    bad = tmp_path / 'opset3.py'
    bad.write_text(f"_base_ = ['{ROOT / 'configs/deploy/classification_onnxruntime_dynamic.py'}']\n"
                   'onnx_config = dict(opset_version=3)\n')
    proc = deploy(CLS_CFG, cls_run['ckpt'], tmp_path / 'out', toy_root, '--deploy-cfg', str(bad), check=False)
    assert 'mmdeploy could not export ImageClassifier to ONNX' in _error(proc)
    assert not (tmp_path / 'out' / 'end2end.onnx').exists()


def test_existing_outputs_need_force(cls_run, toy_root, tmp_path):
    out = tmp_path / 'out'
    deploy(CLS_CFG, cls_run['ckpt'], out, toy_root)
    before = (out / 'end2end.onnx').read_bytes()
    proc = deploy(CLS_CFG, cls_run['ckpt'], out, toy_root, check=False)
    assert 'already exists; pass --force' in _error(proc)
    assert (out / 'end2end.onnx').read_bytes() == before
