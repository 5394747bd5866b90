"""The toy Cityscapes-format semantic segmentation set.

Street-like scenes (sky, buildings, road, sidewalks, terrain, vegetation, poles, traffic signs, cars,
persons and some ignore pixels) labelled with the real Cityscapes train ids (255 = ignore); each class
has its own base colour and texture, so a segmentor can learn it.  The label maps are single-channel
8-bit PNGs, readable by mmseg's ``CityscapesDataset`` unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from .common import (
    CITY_SUBSET,
    PNG_COMPRESS_LEVEL,
    PathLike,
    atomic_dir,
    check_split_args,
    ellipse_points,
    image_rng,
    polygon_mask,
    progress,
    to_uint8,
    upsampled_noise,
    write_stamp,
)

__all__ = ['CITYSCAPES_TRAIN_IDS', 'IGNORE_INDEX', 'CITY_TRAIN_CITIES', 'CITY_VAL_CITIES', 'CITY_DEFAULT_SPLITS',
           'CITY_DEFAULT_SIZE', 'make_cityscapes']

# Cityscapes train ids (as in cityscapesScripts' labels.py); 255 marks ignored pixels.
CITYSCAPES_TRAIN_IDS: Dict[str, int] = {
    'road': 0, 'sidewalk': 1, 'building': 2, 'wall': 3, 'fence': 4, 'pole': 5, 'traffic light': 6,
    'traffic sign': 7, 'vegetation': 8, 'terrain': 9, 'sky': 10, 'person': 11, 'rider': 12, 'car': 13,
    'truck': 14, 'bus': 15, 'train': 16, 'motorcycle': 17, 'bicycle': 18,
}
IGNORE_INDEX = 255
CITY_TRAIN_CITIES: Tuple[str, ...] = ('toycity', 'toyburg')
CITY_VAL_CITIES: Tuple[str, ...] = ('testburg',)
#: Default (train, val) image counts and (height, width): what the toy configs are tuned for.
CITY_DEFAULT_SPLITS = (120, 30)
CITY_DEFAULT_SIZE = (128, 256)

_T = CITYSCAPES_TRAIN_IDS
# Base RGB colour of each class in the rendered Cityscapes images (close to the official palette).
_CITY_BASE_COLOURS: Dict[int, Tuple[int, int, int]] = {
    _T['road']: (128, 64, 128), _T['sidewalk']: (232, 35, 232), _T['building']: (70, 70, 70),
    _T['pole']: (153, 153, 153), _T['traffic sign']: (220, 220, 0), _T['vegetation']: (107, 142, 35),
    _T['terrain']: (152, 251, 152), _T['sky']: (70, 130, 180), _T['person']: (220, 20, 60),
    _T['car']: (0, 0, 142), IGNORE_INDEX: (20, 20, 20),
}


def _city_label(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, List[Tuple[np.ndarray, np.ndarray]]]:
    """Lay out one street scene; return the train-id map and ``(mask, colour)`` of each car and person."""
    label = np.full((h, w), _T['sky'], dtype=np.uint8)
    horizon = int(h * rng.uniform(0.38, 0.52))

    # buildings along the skyline (with occasional gaps of sky)
    x = 0
    while x < w:
        bw = int(rng.integers(max(w // 14, 4), max(w // 4, 6)))
        if rng.random() > 0.12:
            top = int(rng.uniform(0.04, 0.8) * horizon)
            label[top:horizon + 1, x:x + bw] = _T['building']
        x += bw

    # ground: facades or terrain on both sides, then sidewalks and the road converging to a vanishing point
    vx = w * rng.uniform(0.35, 0.65)
    label[horizon:, : int(vx)] = _T['building'] if rng.random() < 0.5 else _T['terrain']
    label[horizon:, int(vx):] = _T['building'] if rng.random() < 0.5 else _T['terrain']
    half_top = w * rng.uniform(0.01, 0.04)
    road_left, road_right = w * rng.uniform(-0.25, 0.2), w * rng.uniform(0.8, 1.25)
    walk = w * rng.uniform(0.12, 0.3)
    sidewalk = [(vx - half_top * 2.2, horizon), (vx + half_top * 2.2, horizon),
                (road_right + walk, h), (road_left - walk, h)]
    label[polygon_mask(h, w, sidewalk)] = _T['sidewalk']
    road = [(vx - half_top, horizon), (vx + half_top, horizon), (road_right, h), (road_left, h)]
    label[polygon_mask(h, w, road)] = _T['road']

    def ground_x(y: float, frac: float) -> float:
        """x of the point at ``frac`` across the road (0 = left edge, 1 = right edge) on row ``y``."""
        s = (y - horizon) / max(h - horizon, 1)
        left = (vx - half_top) + s * (road_left - (vx - half_top))
        right = (vx + half_top) + s * (road_right - (vx + half_top))
        return left + frac * (right - left)

    # trees
    for _ in range(int(rng.integers(0, 4))):
        y = rng.uniform(horizon, horizon + 0.25 * (h - horizon))
        side = -0.35 if rng.random() < 0.5 else 1.35
        cx = ground_x(y, side + rng.uniform(-0.1, 0.1))
        s = 0.3 + (y - horizon) / max(h - horizon, 1)
        trunk_h, crown = s * h * rng.uniform(0.15, 0.3), s * h * rng.uniform(0.1, 0.2)
        label[polygon_mask(h, w, [(cx - 2.5, y), (cx + 2.5, y), (cx + 2.5, y - trunk_h), (cx - 2.5, y - trunk_h)])] = \
            _T['vegetation']
        crown_pts = ellipse_points(cx, y - trunk_h, crown * rng.uniform(0.8, 1.4), crown)
        label[polygon_mask(h, w, crown_pts)] = _T['vegetation']

    # poles with traffic signs
    for _ in range(int(rng.integers(1, 4))):
        y = rng.uniform(horizon + 0.1 * (h - horizon), h * 0.95)
        cx = ground_x(y, -0.12 if rng.random() < 0.5 else 1.12)
        s = (y - horizon) / max(h - horizon, 1)
        pole_h = (0.2 + s) * h * 0.6
        pw = max(3.0, 5.0 * s)  # at least 6 px wide: thinner poles vanish at a stride-8 output
        label[polygon_mask(h, w, [(cx - pw, y), (cx + pw, y), (cx + pw, y - pole_h), (cx - pw, y - pole_h)])] = \
            _T['pole']
        if rng.random() < 0.85:
            sz = max(8.0, 16 * s)
            sign = [(cx - sz, y - pole_h), (cx + sz, y - pole_h), (cx + sz, y - pole_h + sz),
                    (cx - sz, y - pole_h + sz)]
            label[polygon_mask(h, w, sign)] = _T['traffic sign']

    # cars on the road and persons on the sidewalks, far ones first
    things = []
    for _ in range(int(rng.integers(0, 4))):
        things.append(('car', rng.uniform(horizon + 0.08 * (h - horizon), h * 0.98)))
    for _ in range(int(rng.integers(0, 4))):
        things.append(('person', rng.uniform(horizon + 0.05 * (h - horizon), h * 0.98)))
    things.sort(key=lambda item: item[1])
    instances: List[Tuple[np.ndarray, np.ndarray]] = []
    for kind, y in things:
        s = (y - horizon) / max(h - horizon, 1)
        if kind == 'car':
            cx = ground_x(y, rng.uniform(0.15, 0.85))
            cw = max(6.0, s * w * rng.uniform(0.22, 0.32))
            ch = cw * rng.uniform(0.45, 0.6)
            body = [(cx - cw / 2, y), (cx + cw / 2, y), (cx + cw / 2, y - ch * 0.55), (cx + cw * 0.3, y - ch),
                    (cx - cw * 0.3, y - ch), (cx - cw / 2, y - ch * 0.55)]
            mask = polygon_mask(h, w, body)
            colour = rng.choice(np.array([[20, 20, 120], [0, 0, 150], [40, 40, 170], [10, 30, 110]]))
            colour = colour + rng.normal(0, 10, size=3)
        else:
            cx = ground_x(y, -0.1 if rng.random() < 0.5 else 1.1) + rng.uniform(-2, 2)
            ph = max(14.0, s * h * rng.uniform(0.4, 0.6))
            pw = ph * rng.uniform(0.3, 0.4)
            body = [(cx - pw / 2, y), (cx + pw / 2, y), (cx + pw / 2, y - ph * 0.8), (cx - pw / 2, y - ph * 0.8)]
            head = ellipse_points(cx, y - ph * 0.88, ph * 0.09, ph * 0.11, num=12)
            mask = polygon_mask(h, w, body) | polygon_mask(h, w, head)
            colour = np.array(_CITY_BASE_COLOURS[_T['person']], dtype=np.float64) + rng.normal(0, 25, size=3)
        if mask.sum() == 0:
            continue
        label[mask] = _T[kind]
        instances.append((mask, colour))

    # ignored pixels: an ego-vehicle bonnet at the bottom and a few unlabelled blobs
    if rng.random() < 0.6:
        depth = h * rng.uniform(0.04, 0.1)
        bonnet = ellipse_points(w / 2, h + depth * 0.5, w * 0.7, depth * 1.5, num=40)
        label[polygon_mask(h, w, bonnet)] = IGNORE_INDEX
    for _ in range(int(rng.integers(1, 3))):
        bx, by = rng.uniform(0, w), rng.uniform(horizon * 0.5, h)
        r = rng.uniform(1.5, 0.05 * h + 2)
        label[polygon_mask(h, w, ellipse_points(bx, by, r * rng.uniform(0.6, 1.6), r, num=12))] = IGNORE_INDEX
    return label, instances


def _city_image(rng: np.random.Generator, label: np.ndarray,
                instances: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Colour a train-id map: a class-specific base colour, per-class texture, lighting and noise."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), dtype=np.float64)
    blotch = upsampled_noise(rng, h, w, 6, 1)
    for cls, base in _CITY_BASE_COLOURS.items():
        mask = label == cls
        if not mask.any():
            continue
        colour = np.array(base, dtype=np.float64) + rng.normal(0, 10, size=3)
        layer = np.broadcast_to(colour, (h, w, 3)).copy()
        if cls == _T['sky']:
            layer += (yy / h * 60.0)[..., None]
        elif cls == _T['building']:
            period_x, period_y = rng.integers(5, 10), rng.integers(6, 11)
            windows = ((xx % period_x) < period_x * 0.5) & ((yy % period_y) < period_y * 0.45)
            layer += (windows * -28.0)[..., None] + 25.0 * blotch
        elif cls == _T['road']:
            layer += rng.normal(0, 9, size=(h, w, 1))
        elif cls == _T['sidewalk']:
            tile = max(int(rng.integers(4, 8)), 2)
            grout = ((xx % tile) < 1) | ((yy % tile) < 1)
            layer += (grout * -35.0)[..., None]
        elif cls == _T['vegetation']:
            layer += rng.normal(0, 22, size=(h, w, 1)) * np.array([0.6, 1.0, 0.4])
        elif cls == _T['terrain']:
            layer += 30.0 * blotch + rng.normal(0, 8, size=(h, w, 1))
        img[mask] = layer[mask]
    for mask, colour in instances:
        visible = mask & np.isin(label, (_T['car'], _T['person']))
        img[visible] = colour + rng.normal(0, 6, size=(int(visible.sum()), 3))
    img *= rng.uniform(0.8, 1.15)  # global illumination
    img += rng.normal(0, 4, size=img.shape)
    return to_uint8(img)


def _city_split(root: Path, split: str, split_idx: int, num_images: int, cities: Tuple[str, ...],
                size_hw: Tuple[int, int], seed: int, verbose: bool) -> None:
    """Write the images and label maps of one split, spread over ``cities``."""
    h, w = size_hw
    with progress(f'cityscapes {split}', num_images, verbose) as advance:
        for index in range(num_images):
            rng = image_rng(seed, CITY_SUBSET, split_idx, index)
            city = cities[index % len(cities)]
            stem = f'{city}_{index // len(cities):06d}_000019'
            img_dir = root / 'leftImg8bit' / split / city
            seg_dir = root / 'gtFine' / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            seg_dir.mkdir(parents=True, exist_ok=True)
            label, instances = _city_label(rng, h, w)
            img = _city_image(rng, label, instances)
            Image.fromarray(img, 'RGB').save(img_dir / f'{stem}_leftImg8bit.png', format='PNG',
                                             compress_level=PNG_COMPRESS_LEVEL)
            Image.fromarray(label, 'L').save(seg_dir / f'{stem}_gtFine_labelTrainIds.png', format='PNG',
                                             compress_level=PNG_COMPRESS_LEVEL)
            advance()


def make_cityscapes(out_dir: PathLike, num_train: int = CITY_DEFAULT_SPLITS[0], num_val: int = CITY_DEFAULT_SPLITS[1],
                    size_hw: Tuple[int, int] = CITY_DEFAULT_SIZE, seed: int = 0, *,
                    overwrite: bool = False, verbose: bool = False) -> Dict[str, Path]:
    """Write a Cityscapes-format semantic segmentation set into ``out_dir`` (its ``data_root``).

    Args:
        out_dir: folder to create; it gets ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
            ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (train ids, 255 = ignore).
        num_train: number of training images (spread over the cities in ``CITY_TRAIN_CITIES``).
        num_val: number of validation images (cities in ``CITY_VAL_CITIES``).
        size_hw: image ``(height, width)`` in pixels.
        seed, overwrite, verbose: as for :func:`~orepa_mm.toy_data.make_coco`.

    Returns:
        Paths ``root``, ``train_img_dir``, ``val_img_dir``, ``train_seg_dir`` and ``val_seg_dir``.
    """
    check_split_args(num_train, num_val, seed)
    h, w = (int(v) for v in size_hw)
    if h < 32 or w < 32:
        raise ValueError(f'size_hw must be at least 32x32, got {h}x{w}')
    root = Path(out_dir)
    with atomic_dir(root, overwrite) as tmp:
        for split_idx, (split, num, cities) in enumerate((('train', num_train, CITY_TRAIN_CITIES),
                                                          ('val', num_val, CITY_VAL_CITIES))):
            _city_split(tmp, split, split_idx, num, cities, (h, w), seed, verbose)
        write_stamp(tmp, 'cityscapes', num_train=num_train, num_val=num_val, size=[h, w], seed=seed)
    return dict(root=root, train_img_dir=root / 'leftImg8bit' / 'train', val_img_dir=root / 'leftImg8bit' / 'val',
                train_seg_dir=root / 'gtFine' / 'train', val_seg_dir=root / 'gtFine' / 'val')
