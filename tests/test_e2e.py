"""End to end with the real frameworks on the toy data: ``mim train`` and
``mim test`` for an mmdet and an mmseg config (COCO bbox mAP, Cityscapes
mIoU), resuming, fusing a trained checkpoint into a deploy checkpoint that
vanilla mmdet/mmseg test in a process where orepa_mm cannot be imported,
and a 2-process (gloo) distributed run."""
from __future__ import annotations

import json
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from conftest import DET_CFG, DET_ITERS, DET_KEEP_ALL, ROOT, SEG_CFG, _iters, bin_path, last_metric, run
from orepa_mm.toy_data.jobs import TOY_JOBS

pytestmark = pytest.mark.slow

def test_mim_train_and_test_detector(det_run):
    # Evaluated during training and by `mim test` (which loads the checkpoint
    # with torch's weights-only loader: this is what the allowlist enables).
    last_metric(det_run['train'], 'coco/bbox_mAP')
    m = last_metric(det_run["test"], "coco/bbox_mAP")
    assert 0.0 <= m <= 1.0
    assert 'OREPAResNet' in det_run['train'] or 'OREPA' in det_run['train']


def test_mim_train_and_test_segmentor(seg_run):
    miou = last_metric(seg_run['test'], 'mIoU')
    assert 0.0 < miou <= 100.0, 'a segmentor trained on the toy data must get some classes right'


def test_resume_continues_from_checkpoint(det_run, toy_root):
    work = det_run['work']
    more = DET_ITERS + 4
    out = run([bin_path('mim'), 'train', 'mmdet', str(DET_CFG), '--work-dir', str(work), '--resume']
              + _iters(more, more), cwd=toy_root)
    log = out.stdout + out.stderr
    assert f'resumed epoch: 0, iter: {DET_ITERS}' in log.replace('resumed epoch: 1', 'resumed epoch: 0'), log[-3000:]
    assert (work / f'iter_{more}.pth').is_file()
    assert f'Iter(train) [{DET_ITERS - 4}/{more}]' not in log  # did not start over


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_fused_deploy_checkpoint_reproduces_metric_without_orepa_mm(kind, det_run, seg_run, toy_root,
                                                                    no_orepa_env):
    cfg, res, metric, fw = ((DET_CFG, det_run, 'coco/bbox_mAP', 'mmdet') if kind == 'det'
                            else (SEG_CFG, seg_run, 'mIoU', 'mmseg'))
    out_dir = toy_root / f'fused_{kind}'
    run([sys.executable, str(ROOT / 'tools/fuse_checkpoint.py'), str(cfg), str(res['ckpt']), str(out_dir),
         '--verify'], cwd=toy_root)
    name = cfg.stem
    fused_cfg, fused_ckpt = out_dir / f'{name}_fused.py', out_dir / f'{name}_fused.pth'
    text = fused_cfg.read_text()
    assert 'orepa_mm' not in text and 'OREPA' not in text
    extra = ['--out', str(toy_root / 'det_preds_fused.pkl'), '--cfg-options'] + DET_KEEP_ALL if kind == 'det' else []
    test = run([bin_path('mim'), 'test', fw, str(fused_cfg), '--checkpoint', str(fused_ckpt), '--work-dir',
                str(toy_root / f'test_fused_{kind}')] + extra, cwd=toy_root, env=no_orepa_env)
    log = test.stdout + test.stderr
    assert abs(last_metric(log, metric) - last_metric(res['test'], metric)) < 1e-3
    if kind == 'det':  # beyond the metric: the predictions themselves agree
        with open(toy_root / 'det_preds.pkl', 'rb') as f:
            ref = pickle.load(f)
        with open(toy_root / 'det_preds_fused.pkl', 'rb') as f:
            got = pickle.load(f)
        for a, b in zip(ref, got):
            sa, sb = a['pred_instances']['scores'], b['pred_instances']['scores']
            assert len(sa) > 0
            n = min(len(sa), len(sb), 20)
            np.testing.assert_allclose(np.asarray(sa[:n]), np.asarray(sb[:n]), atol=1e-4)


def test_branch_similarity_tool_on_a_toy_checkpoint(seg_run, toy_root):
    """Table, JSON and plot for two checkpoints; one per layer of the toy ResNetV1c-18 with several branches."""
    out_dir = toy_root / 'similarity'
    tool = str(ROOT / 'tools/analysis_tools/branch_similarity.py')
    out = run([sys.executable, tool, str(SEG_CFG), str(seg_run['ckpt']), str(SEG_CFG), str(seg_run['ckpt']),
               '--labels', 'first', 'second', '--out-dir', str(out_dir)], cwd=toy_root)
    data = json.loads((out_dir / 'branch_similarity.json').read_text())
    assert list(data) == ['first', 'second'] and data['first']['mean_cosine'] == data['second']['mean_cosine']
    assert len(data['first']['layers']) == 22  # ResNetV1c-18: deep stem 3 + block convs 16 + downsamples 3
    assert -1 <= data['first']['mean_cosine'] <= 1
    assert (out_dir / 'branch_similarity.png').stat().st_size > 10_000
    assert '| first |' in (out_dir / 'branch_similarity.md').read_text() and '| first |' in out.stdout
    bad = run([sys.executable, tool, str(SEG_CFG)], cwd=toy_root, check=False)
    assert bad.returncode == 2 and 'give CONFIG CHECKPOINT pairs' in bad.stderr


def test_branch_similarity_hook_during_training(toy_root):
    cfg = toy_root / 'seg_with_similarity_hook.py'
    cfg.write_text(f"_base_ = '{SEG_CFG}'\n"
                   "custom_hooks = [dict(type='BranchSimilarityHook', interval=2)]\n")
    work = toy_root / 'work_seg_similarity'
    train = run([bin_path('mim'), 'train', 'mmseg', str(cfg), '--work-dir', str(work)] + _iters(4, 4)
                + ['default_hooks.logger.interval=2', 'train_cfg.val_interval=100'], cwd=toy_root)
    history = json.loads((work / 'branch_similarity.json').read_text())['history']
    assert [h['iter'] for h in history] == [2, 4]
    assert all(-1 <= h['mean_cosine'] <= 1 and len(h['layers']) == 22 for h in history)
    assert 'branch_similarity: ' in train.stdout + train.stderr


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_quantization_check_on_toy_checkpoints(kind, det_run, seg_run, toy_root):
    """fp32 and INT8 metrics from the framework's evaluator, per-layer statistics and the plot;
    a checkpoint of another model is refused."""
    cfg, res, metric = (DET_CFG, det_run, 'coco/bbox_mAP') if kind == 'det' else (SEG_CFG, seg_run, 'mIoU')
    out_dir = toy_root / f'quantization_{kind}'
    tool = str(ROOT / 'tools/analysis_tools/quantization_check.py')
    keep_all = ['--cfg-options'] + DET_KEEP_ALL if kind == 'det' else []
    methods = ['minmax', 'percentile', 'entropy'] if kind == 'det' else ['minmax']
    run([sys.executable, tool, str(cfg), str(res['ckpt']), '--out-dir', str(out_dir), '--calib-batches', '2',
         '--calibration', *methods] + keep_all, cwd=toy_root)
    report = json.loads((out_dir / 'quantization_check.json').read_text())
    assert metric in report['fp32'] and metric in report['int8']
    assert list(report['by_calibration']) == methods and report['int8'] == report['by_calibration']['minmax']['int8']
    for m in methods:  # each method its own INT8 model and evaluation
        assert metric in report['by_calibration'][m]['int8'], m
        assert (out_dir / f'{cfg.stem}_features_int8{"" if m == "minmax" else "-" + m}.onnx').is_file()
    assert f'INT8 ({methods[-1]})' in (out_dir / 'quantization_check.md').read_text()
    assert abs(report['fp32'][metric] - last_metric(res['test'], metric)) < 1e-3  # the same evaluation as mim test
    assert report['onnx_fp32_max_rel_diff'] < 1e-4
    assert report['layers'] and all(r['layer'].startswith(('backbone.', 'neck.')) for r in report['layers'])
    assert all(0 < r['int8_weight_error'] < 0.05 for r in report['layers'])
    assert (out_dir / 'quantization_check.png').stat().st_size > 10_000
    other = SEG_CFG if kind == 'det' else DET_CFG
    bad = run([sys.executable, tool, str(other), str(res['ckpt']), '--out-dir', str(out_dir / 'bad')], cwd=toy_root,
              check=False)
    assert bad.returncode == 2 and 'fits neither' in bad.stderr, bad.stderr[-500:]


def test_blocked_import_really_blocks(no_orepa_env, toy_root):
    out = run([sys.executable, '-c', 'import orepa_mm'], cwd=toy_root, env=no_orepa_env, check=False)
    assert out.returncode != 0 and 'blocked' in out.stderr


def test_distributed_two_process_gloo(toy_root):
    work = toy_root / 'work_dist'
    out = run(['bash', str(ROOT / 'tools/dist_train.sh'), str(DET_CFG), '2', '--work-dir', str(work)]
              + _iters(2, 2), cwd=toy_root, env={'OMP_NUM_THREADS': '1', 'PORT': '29517', 'PYTHON': sys.executable,
                                           'GLOO_SOCKET_IFNAME': 'lo'})
    log = out.stdout + out.stderr
    assert 'Distributed training: True' in log and 'MMDistributedDataParallel' in log, log[-3000:]
    assert (work / 'iter_2.pth').is_file()
    import orepa_mm  # noqa: F401  (weights-only allowlist for mmengine checkpoints)
    sd = torch.load(work / 'iter_2.pth', map_location='cpu')['state_dict']
    assert any('branches' in k for k in sd)


def test_toy_plain_and_orepa_detectors_same_iterations(det_run, toy_root):
    """Both mAPs are reported, which is higher is not asserted."""
    from conftest import REPORT
    plain_cfg = ROOT / 'configs/toy/faster-rcnn_r18w16-plain_fpn_300i_toy-coco.py'
    work = toy_root / 'work_det_plain'
    out = run([bin_path('mim'), 'train', 'mmdet', str(plain_cfg), '--work-dir', str(work)]
              + _iters(DET_ITERS, DET_ITERS) + DET_KEEP_ALL, cwd=toy_root)
    plain_map = last_metric(out.stdout + out.stderr, 'coco/bbox_mAP')
    orepa_map = last_metric(det_run['train'], 'coco/bbox_mAP')
    assert 0.0 <= plain_map <= 1.0 and 0.0 <= orepa_map <= 1.0
    REPORT[f'toy Faster R-CNN bbox mAP after {DET_ITERS} iterations'] = \
        f'plain {plain_map:.4f}, OREPA {orepa_map:.4f}'


#: The toy OREPA-everywhere configs (backbone, neck, heads), which follow the toy OREPA configs.
ALL_JOBS = {'det': (TOY_JOBS['detector'], 'mmdet'), 'seg': (TOY_JOBS['segmentor'], 'mmseg')}
ALL_ITERS = 4


@pytest.mark.parametrize('kind', list(ALL_JOBS))
def test_orepa_all_toy_model_fused_reproduces_metric_without_orepa_mm(kind, toy_root, no_orepa_env):
    """OREPA in backbone, neck and heads: train a few iterations (the
    in-training evaluation runs on the test set), fuse with --verify, and
    evaluate the deploy checkpoint with vanilla mmdet/mmseg in a process
    where orepa_mm cannot be imported: the same metric, and for the detector
    the same detections as the unfused model's `mim test`."""
    from conftest import REPORT
    job, fw = ALL_JOBS[kind]
    cfg = ROOT / job.config('orepa').replace('-orepa_', '-orepa-all_')
    work = toy_root / f'work_all_{kind}'
    # A few iterations leave every score under the default threshold: keep them all.
    keep = ['model.test_cfg.score_thr=0.0'] if kind == 'det' else []
    train = run([bin_path('mim'), 'train', fw, str(cfg), '--work-dir', str(work)] + _iters(ALL_ITERS, ALL_ITERS)
                + keep, cwd=toy_root)
    trained = last_metric(train.stdout + train.stderr, job.metric)
    ckpt, out_dir = work / f'iter_{ALL_ITERS}.pth', toy_root / f'fused_all_{kind}'
    fuse = run([sys.executable, str(ROOT / 'tools/fuse_checkpoint.py'), str(cfg), str(ckpt), str(out_dir),
                '--verify'], cwd=toy_root)
    gaps = re.findall(r'max \|fused - unfused\| / \|out\| = ([0-9.e+-]+)', fuse.stdout + fuse.stderr)
    assert gaps and float(gaps[-1]) <= 1e-5, fuse.stdout[-2000:]
    gap = float(gaps[-1])
    fused_cfg, fused_ckpt = out_dir / f'{cfg.stem}_fused.py', out_dir / f'{cfg.stem}_fused.pth'
    text = fused_cfg.read_text()
    assert 'orepa_mm' not in text and 'OREPA' not in text
    preds = {}
    tests = [('fused', fused_cfg, fused_ckpt, no_orepa_env)]
    if kind == 'det':  # mAP after a few iterations can be 0: compare the detections too
        tests.append(('unfused', cfg, ckpt, None))
    for name, test_cfg, test_ckpt, env in tests:
        extra = ['--out', str(toy_root / f'all_preds_{name}.pkl'), '--cfg-options'] + keep if kind == 'det' else []
        test = run([bin_path('mim'), 'test', fw, str(test_cfg), '--checkpoint', str(test_ckpt), '--work-dir',
                    str(toy_root / f'test_all_{kind}_{name}')] + extra, cwd=toy_root, env=env)
        preds[name] = last_metric(test.stdout + test.stderr, job.metric)
    assert abs(preds['fused'] - trained) < 1e-3
    if kind == 'det':
        with open(toy_root / 'all_preds_unfused.pkl', 'rb') as f:
            ref = pickle.load(f)
        with open(toy_root / 'all_preds_fused.pkl', 'rb') as f:
            got = pickle.load(f)
        assert len(ref) == len(got) > 0
        for a, b in zip(ref, got):
            sa, sb = np.asarray(a['pred_instances']['scores']), np.asarray(b['pred_instances']['scores'])
            assert len(sa) > 0
            n = min(len(sa), len(sb), 20)
            np.testing.assert_allclose(sa[:n], sb[:n], atol=1e-4)
    REPORT[f'toy {cfg.stem} after {ALL_ITERS} iterations'] = \
        f'{job.metric_name} {trained:.4f} (OREPA), {preds["fused"]:.4f} (fused, vanilla {fw}); verify gap {gap:.2e}'
