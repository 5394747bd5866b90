"""Tests for orepa_mm.toy_data and its command line tools/misc/make_toy_data.py: determinism, loading
through the real mmdet / mmseg / mmpretrain datasets, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from orepa_mm import toy_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'misc' / 'make_toy_data.py'

COCO_TRAIN, COCO_VAL, COCO_SIZE = 3, 10, 96
CITY_TRAIN, CITY_VAL, CITY_HW = 2, 4, (64, 128)


def _tree_bytes(root: Path) -> Dict[str, bytes]:
    """All files under ``root`` as ``{relative path: content}``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = toy_data.make_coco(tmp_path_factory.mktemp('toy') / 'coco', COCO_TRAIN, COCO_VAL, COCO_SIZE, seed=0)
    return paths['root']


@pytest.fixture(scope='module')
def city_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = toy_data.make_cityscapes(tmp_path_factory.mktemp('toy') / 'cityscapes', CITY_TRAIN, CITY_VAL, CITY_HW,
                                seed=0)
    return paths['root']


def test_coco_layout_and_returned_paths(tmp_path: Path) -> None:
    paths = toy_data.make_coco(tmp_path / 'coco', 2, 1, 64, seed=3)
    assert paths['root'] == tmp_path / 'coco'
    assert paths['train_ann_file'] == tmp_path / 'coco' / 'annotations' / 'instances_train2017.json'
    assert paths['val_ann_file'] == tmp_path / 'coco' / 'annotations' / 'instances_val2017.json'
    assert sorted(p.name for p in paths['train_img_dir'].iterdir()) == ['000000000001.jpg', '000000000002.jpg']
    assert sorted(p.name for p in paths['val_img_dir'].iterdir()) == ['000000000001.jpg']
    # nothing but the target folder is left next to it (no temporary folders)
    assert [p.name for p in tmp_path.iterdir()] == ['coco']
    ann = json.loads(paths['train_ann_file'].read_text())
    assert [img['id'] for img in ann['images']] == [1, 2]
    assert [a['id'] for a in ann['annotations']] == list(range(1, len(ann['annotations']) + 1))
    for img in ann['images']:
        with Image.open(paths['train_img_dir'] / img['file_name']) as im:
            assert im.size == (img['width'], img['height']) == (64, 64)
            assert im.mode == 'RGB'
    for a in ann['annotations']:
        assert a['iscrowd'] == 0 and a['area'] > 0
        poly = a['segmentation'][0]
        assert len(poly) >= 6 and len(poly) % 2 == 0
        xs, ys = poly[0::2], poly[1::2]
        assert a['bbox'] == pytest.approx([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], abs=0.02)
        assert 0 <= min(xs) and max(xs) <= 64 and 0 <= min(ys) and max(ys) <= 64


def test_cityscapes_layout(tmp_path: Path) -> None:
    paths = toy_data.make_cityscapes(tmp_path / 'cs', 3, 1, (48, 96), seed=3)
    imgs = sorted(str(p.relative_to(paths['root'])) for p in paths['root'].rglob('*.png'))
    assert imgs == [
        'gtFine/train/toyburg/toyburg_000000_000019_gtFine_labelTrainIds.png',
        'gtFine/train/toycity/toycity_000000_000019_gtFine_labelTrainIds.png',
        'gtFine/train/toycity/toycity_000001_000019_gtFine_labelTrainIds.png',
        'gtFine/val/testburg/testburg_000000_000019_gtFine_labelTrainIds.png',
        'leftImg8bit/train/toyburg/toyburg_000000_000019_leftImg8bit.png',
        'leftImg8bit/train/toycity/toycity_000000_000019_leftImg8bit.png',
        'leftImg8bit/train/toycity/toycity_000001_000019_leftImg8bit.png',
        'leftImg8bit/val/testburg/testburg_000000_000019_leftImg8bit.png',
    ]
    assert paths['val_seg_dir'] == paths['root'] / 'gtFine' / 'val'
    with Image.open(paths['val_img_dir'] / 'testburg' / 'testburg_000000_000019_leftImg8bit.png') as im:
        assert im.mode == 'RGB' and im.size == (96, 48)


def test_deterministic(tmp_path: Path, coco_root: Path, city_root: Path) -> None:
    same_coco = toy_data.make_coco(tmp_path / 'a' / 'coco', COCO_TRAIN, COCO_VAL, COCO_SIZE, seed=0)['root']
    same_city = toy_data.make_cityscapes(tmp_path / 'a' / 'cs', CITY_TRAIN, CITY_VAL, CITY_HW, seed=0)['root']
    assert _tree_bytes(same_coco) == _tree_bytes(coco_root)
    assert _tree_bytes(same_city) == _tree_bytes(city_root)

    other_coco = _tree_bytes(toy_data.make_coco(tmp_path / 'b' / 'coco', COCO_TRAIN, COCO_VAL, COCO_SIZE,
                                                seed=1)['root'])
    other_city = _tree_bytes(toy_data.make_cityscapes(tmp_path / 'b' / 'cs', CITY_TRAIN, CITY_VAL, CITY_HW,
                                                      seed=1)['root'])
    reference = _tree_bytes(coco_root)
    assert other_coco.keys() == reference.keys()
    assert all(other_coco[k] != reference[k] for k in reference)  # every image and both json files change
    reference = _tree_bytes(city_root)
    assert other_city.keys() == reference.keys()
    assert all(other_city[k] != reference[k] for k in reference)


def test_coco_loads_in_mmdet(coco_root: Path) -> None:
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()

    ds = CocoDataset(data_root=str(coco_root), ann_file='annotations/instances_val2017.json',
                     data_prefix=dict(img='val2017/'), pipeline=[], test_mode=False)
    ann = json.loads((coco_root / 'annotations' / 'instances_val2017.json').read_text())
    assert len(ds) == COCO_VAL
    # default COCO metainfo: the toy categories are the first three COCO classes, labels 0..2
    assert ds.metainfo['classes'][:3] == toy_data.COCO_TOY_CLASSES
    assert [c['name'] for c in ann['categories']] == list(ds.metainfo['classes'])

    instances = [inst for i in range(len(ds)) for inst in ds.get_data_info(i)['instances']]
    assert len(instances) == len(ann['annotations']) >= COCO_VAL
    labels = {inst['bbox_label'] for inst in instances}
    assert labels == {0, 1, 2}
    assert all(inst['ignore_flag'] == 0 and inst['mask'] for inst in instances)
    areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in (inst['bbox'] for inst in instances)])
    assert areas.min() < areas.max() / 10
    first = ds.get_data_info(0)
    assert Path(first['img_path']) == coco_root / 'val2017' / '000000000001.jpg'
    assert Path(first['img_path']).is_file()
    assert (first['height'], first['width']) == (COCO_SIZE, COCO_SIZE)

    # some objects overlap (pairs of boxes in one image that intersect)
    def overlaps(a, b) -> bool:
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    n_overlaps = sum(overlaps(a['bbox'], b['bbox'])
                     for i in range(len(ds)) for j, a in enumerate(ds.get_data_info(i)['instances'])
                     for b in ds.get_data_info(i)['instances'][j + 1:])
    assert n_overlaps >= 1


def test_cityscapes_loads_in_mmseg(city_root: Path) -> None:
    from mmseg.datasets import CityscapesDataset
    from mmseg.utils import register_all_modules
    register_all_modules()

    ds = CityscapesDataset(data_root=str(city_root),
                           data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'), pipeline=[])
    assert len(ds) == CITY_VAL
    assert len(ds.metainfo['classes']) == 19
    seen = set()
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        assert Path(info['seg_map_path']).is_file() and info['reduce_zero_label'] is False
        with Image.open(info['img_path']) as im:
            assert im.mode == 'RGB' and im.size == (CITY_HW[1], CITY_HW[0])
        with Image.open(info['seg_map_path']) as seg:
            assert seg.mode == 'L' and seg.size == (CITY_HW[1], CITY_HW[0])
            values = set(np.unique(np.asarray(seg)).tolist())
        assert values <= set(range(19)) | {255}
        assert len(values - {255}) >= 4  # several classes in every image
        seen |= values
    t = toy_data.CITYSCAPES_TRAIN_IDS
    assert {t['road'], t['sidewalk'], t['building'], t['sky'], 255} <= seen
    assert len(seen - {255}) >= 6


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / 'toy'
    small = ['--out', str(out), '--only', 'coco', '--coco-train', '1', '--coco-val', '1', '--coco-size', '48']
    first = _run_cli(*small)
    assert first.returncode == 0, first.stderr
    assert 'make_toy_data' in first.stdout
    ann = out / 'coco' / 'annotations' / 'instances_val2017.json'
    before = _tree_bytes(out)
    assert str(ann.relative_to(out)) in before and not (out / 'cityscapes').exists()

    again = _run_cli(*small, '--seed', '5')
    assert again.returncode == 2  # a user error
    assert '--force' in again.stderr and 'coco' in again.stderr
    assert _tree_bytes(out) == before  # untouched, no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ['coco']

    forced = _run_cli(*small, '--seed', '5', '--force')
    assert forced.returncode == 0, forced.stderr
    after = _tree_bytes(out)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in out.iterdir()) == ['coco']

    with pytest.raises(FileExistsError):
        toy_data.make_coco(out / 'coco', 1, 1, 48, seed=0)


def test_cli_city_size_argument(tmp_path: Path) -> None:
    out = tmp_path / 'toy'
    res = _run_cli('--out', str(out), '--only', 'cityscapes', '--city-train', '1', '--city-val', '1',
                   '--city-size', '40x72', '--seed', '2')
    assert res.returncode == 0, res.stderr
    assert not (out / 'coco').exists()
    with Image.open(next((out / 'cityscapes' / 'gtFine' / 'val').rglob('*_gtFine_labelTrainIds.png'))) as seg:
        assert seg.size == (72, 40)
    bad = _run_cli('--out', str(tmp_path / 'x'), '--city-size', '128by256')
    assert bad.returncode == 2 and 'HEIGHTxWIDTH' in bad.stderr
    assert not (tmp_path / 'x').exists()


def test_package_import_does_not_load_toy_data() -> None:
    """``import orepa_mm`` stays free of the toy-data module (and so of its Pillow need)."""
    code = 'import sys, orepa_mm; assert "orepa_mm.toy_data" not in sys.modules, sorted(sys.modules)'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ensure_keeps_current_sets_and_refuses_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / 'toy'
    toy_data.make_coco(root / 'coco', 1, 1, 48, seed=0)
    toy_data.make_cityscapes(root / 'cityscapes', 1, 1, (40, 72), seed=0)
    toy_data.make_imagenet(root / 'imagenet', 1, 1, 32, seed=0)
    before = {name: _tree_bytes(root / name) for name in ('coco', 'cityscapes', 'imagenet')}
    assert toy_data.ensure_toy_data(root, verbose=False) == []  # current sets are kept as they are
    assert {name: _tree_bytes(root / name) for name in before} == before
    stamp = root / 'coco' / 'orepa_toy_data.json'
    assert json.loads(stamp.read_text())['size'] == 48
    stamp.unlink()  # what an older generator left: no stamp
    with pytest.raises(toy_data.StaleToyDataError, match=r'coco was written by toy-data generator version 1.*--force'):
        toy_data.ensure_toy_data(root, verbose=False)
    assert _tree_bytes(root / 'cityscapes') == before['cityscapes']


def test_imagenet_layout_determinism_and_mmpretrain_dataset(tmp_path: Path) -> None:
    """The ImageNet-format set: the same seed writes the same bytes, each annotation line names a file of
    its split, the labels cover the classes, and mmpretrain's own ``ImageNet`` dataset reads it."""
    from mmpretrain.datasets import ImageNet

    paths = toy_data.make_imagenet(tmp_path / 'a' / 'imagenet', 30, 12, 48, seed=0)
    root = paths['root']
    assert _tree_bytes(toy_data.make_imagenet(tmp_path / 'b' / 'imagenet', 30, 12, 48, seed=0)['root']) \
        == _tree_bytes(root)
    assert _tree_bytes(toy_data.make_imagenet(tmp_path / 'c' / 'imagenet', 30, 12, 48, seed=1)['root']) \
        != _tree_bytes(root)
    classes = toy_data.IMAGENET_TOY_CLASSES
    for split, n in (('train', 30), ('val', 12)):
        lines = paths[f'{split}_ann_file'].read_text().splitlines()
        assert len(lines) == n
        labels = []
        for line in lines:
            rel, label = line.split()
            with Image.open(root / split / rel) as img:
                assert img.size == (48, 48) and img.mode == 'RGB'
            if split == 'train':
                assert rel.split('/')[0] == classes[int(label)]  # the class folder is the label's name
            labels.append(int(label))
        assert set(labels) <= set(range(len(classes)))
    assert len(set(labels)) > 1
    dataset = ImageNet(data_root=str(root), split='val', metainfo=dict(classes=classes), pipeline=[])
    assert len(dataset) == 12 and dataset.CLASSES == classes
    assert [dataset.get_data_info(i)['gt_label'] for i in range(12)] == labels
    with pytest.raises(ValueError, match='at least 32'):
        toy_data.make_imagenet(tmp_path / 'd', 1, 1, 16)
