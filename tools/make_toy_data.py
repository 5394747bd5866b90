"""Generate small synthetic COCO-format and Cityscapes-format data sets for CPU smoke training.

Everything is drawn from ``numpy.random.default_rng`` seeded from ``--seed`` (each image from its own
``[seed, subset, split, index]`` stream), so one seed always gives byte-identical files, and the images of
one split do not change when the size of the other split changes.

Layout written under ``--out`` (default ``data/toy``)::

    coco/train2017/000000000001.jpg ...
    coco/val2017/000000000001.jpg ...
    coco/annotations/instances_train2017.json
    coco/annotations/instances_val2017.json
    cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png

COCO set: every image shows 1-6 objects of three shapes (rectangle, ellipse, triangle) with random
colours, sizes from about 8 px to 60 % of the image side, aspect ratios and partial overlaps, on a
textured background (gradient, stripes, blotches and noise).  Each object is annotated with its full
polygon, the polygon's bounding box and area, ``iscrowd=0``.  The json declares all 80 COCO categories
with their usual ids and names, and the shapes use the first three of them (rectangle -> ``person``
(id 1), ellipse -> ``bicycle`` (id 2), triangle -> ``car`` (id 3)).  This way mmdet's ``CocoDataset``
with its default 80-class metainfo, and any stock COCO config, read the set without changes (label
``i`` is the i-th COCO class); a config may instead set ``metainfo=dict(classes=COCO_TOY_CLASSES)`` and a
3-class head.

Cityscapes set: street-like scenes (sky, buildings, road, sidewalks, terrain, vegetation, poles, traffic
signs, cars, persons and some ignore pixels) labelled with the real Cityscapes train ids (255 = ignore);
each class has its own base colour and texture, so a segmentor can learn it.  The label maps are
single-channel 8-bit PNGs, readable by mmseg's ``CityscapesDataset`` unchanged.

Usage::

    python tools/make_toy_data.py --out data/toy [--seed 0] [--coco-train 48 --coco-val 16 --coco-size 160]
        [--city-train 24 --city-val 8 --city-size 128x256] [--only coco|cityscapes] [--force]

Other code can import the module from its path and call :func:`make_coco` and :func:`make_cityscapes`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

PathLike = Union[str, os.PathLike]
Polygon = List[Tuple[float, float]]

# (id, name) of the 80 COCO categories, in the order mmdet's CocoDataset lists its classes.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'),
    (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'),
    (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'), (18, 'dog'),
    (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'), (23, 'bear'), (24, 'zebra'),
    (25, 'giraffe'), (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'), (32, 'tie'), (33, 'suitcase'),
    (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'), (37, 'sports ball'), (38, 'kite'),
    (39, 'baseball bat'), (40, 'baseball glove'), (41, 'skateboard'), (42, 'surfboard'),
    (43, 'tennis racket'), (44, 'bottle'), (46, 'wine glass'), (47, 'cup'), (48, 'fork'), (49, 'knife'),
    (50, 'spoon'), (51, 'bowl'), (52, 'banana'), (53, 'apple'), (54, 'sandwich'), (55, 'orange'),
    (56, 'broccoli'), (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'), (60, 'donut'), (61, 'cake'),
    (62, 'chair'), (63, 'couch'), (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'),
    (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'), (76, 'keyboard'), (77, 'cell phone'),
    (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'), (82, 'refrigerator'), (84, 'book'),
    (85, 'clock'), (86, 'vase'), (87, 'scissors'), (88, 'teddy bear'), (89, 'hair drier'),
    (90, 'toothbrush'),
)
# Shape drawn for each category that the toy set uses: category id -> shape.
COCO_TOY_SHAPES: Dict[int, str] = {1: 'rectangle', 2: 'ellipse', 3: 'triangle'}
COCO_TOY_CLASSES: Tuple[str, ...] = tuple(name for cid, name in COCO_CATEGORIES if cid in COCO_TOY_SHAPES)

# Cityscapes train ids (as in cityscapesScripts' labels.py); 255 marks ignored pixels.
CITYSCAPES_TRAIN_IDS: Dict[str, int] = {
    'road': 0, 'sidewalk': 1, 'building': 2, 'wall': 3, 'fence': 4, 'pole': 5, 'traffic light': 6,
    'traffic sign': 7, 'vegetation': 8, 'terrain': 9, 'sky': 10, 'person': 11, 'rider': 12, 'car': 13,
    'truck': 14, 'bus': 15, 'train': 16, 'motorcycle': 17, 'bicycle': 18,
}
IGNORE_INDEX = 255
CITY_TRAIN_CITIES: Tuple[str, ...] = ('toycity', 'toyburg')
CITY_VAL_CITIES: Tuple[str, ...] = ('testburg',)

_COCO_SUBSET = 0
_CITY_SUBSET = 1
_JPEG_QUALITY = 90
_PNG_COMPRESS_LEVEL = 6

_T = CITYSCAPES_TRAIN_IDS
# Base RGB colour of each class in the rendered Cityscapes images (close to the official palette).
_CITY_BASE_COLOURS: Dict[int, Tuple[int, int, int]] = {
    _T['road']: (128, 64, 128), _T['sidewalk']: (232, 35, 232), _T['building']: (70, 70, 70),
    _T['pole']: (153, 153, 153), _T['traffic sign']: (220, 220, 0), _T['vegetation']: (107, 142, 35),
    _T['terrain']: (152, 251, 152), _T['sky']: (70, 130, 180), _T['person']: (220, 20, 60),
    _T['car']: (0, 0, 142), IGNORE_INDEX: (20, 20, 20),
}


# --------------------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------------------
def _image_rng(seed: int, subset: int, split: int, index: int) -> np.random.Generator:
    """Return the random stream of one image; it depends only on its own coordinates."""
    return np.random.default_rng([seed, subset, split, index])


def _poly_mask(height: int, width: int, points: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Rasterise a polygon into a boolean ``(height, width)`` mask."""
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                    num: Optional[int] = None) -> Polygon:
    """Vertices of an ellipse with semi-axes ``rx``, ``ry`` rotated by ``angle`` radians."""
    if num is None:
        num = int(np.clip(max(rx, ry), 12, 48))
    t = np.linspace(0.0, 2.0 * math.pi, num, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + xi * ca - yi * sa, cy + xi * sa + yi * ca) for xi, yi in zip(x, y)]


def _polygon_area(points: Sequence[Tuple[float, float]]) -> float:
    """Area of a simple polygon (shoelace formula)."""
    pts = np.asarray(points, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                     channels: int = 1) -> np.ndarray:
    """Smooth noise in ``[-1, 1]``: a coarse random grid bilinearly upsampled to ``(height, width, channels)``."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1, channels))
    gy = np.linspace(0.0, cells, height)
    gx = np.linspace(0.0, cells, width)
    y0 = np.minimum(gy.astype(int), cells - 1)
    x0 = np.minimum(gx.astype(int), cells - 1)
    fy = (gy - y0)[:, None, None]
    fx = (gx - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextmanager
def _atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target`` and move it to ``target`` on success.

    Raises ``FileExistsError`` before anything is written when ``target`` exists and is not an empty
    folder, unless ``overwrite`` is true.  On an error the temporary folder is removed.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f'{target} exists and is not a folder')
    if _is_nonempty_dir(target) and not overwrite:
        raise FileExistsError(f'{target} exists and is not empty; pass --force (overwrite=True) to replace it')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class _Progress:
    """A minimal progress counter on stderr (silent unless enabled)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.count = 0

    def step(self) -> None:
        self.count += 1
        if self.tty:
            sys.stderr.write(f'\r  {self.desc}: {self.count}/{self.total}')
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            prefix = '\r' if self.tty else ''
            sys.stderr.write(f'{prefix}  {self.desc}: {self.count}/{self.total}\n')
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------------
# COCO-format detection / instance segmentation set
# --------------------------------------------------------------------------------------------------
def _coco_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured float RGB background: colour gradient, stripes, smooth blotches and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(int(rng.integers(0, 3))):
        freq = rng.uniform(2.0, 14.0)
        phi = rng.uniform(0, 2 * math.pi)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-6
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)) + rng.uniform(0, 6.3))
        img += rng.uniform(10, 45) * wave[..., None] * direction
    img += rng.uniform(0, 50) * _upsampled_noise(rng, size, size, int(rng.integers(2, 7)), 3)
    img += rng.normal(0.0, rng.uniform(2.0, 14.0), size=img.shape)
    return img


def _shape_polygon(rng: np.random.Generator, shape: str, extent: float) -> Polygon:
    """A polygon of ``shape`` whose bounding box has largest side ``extent``, with its box at the origin."""
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    if shape == 'rectangle':
        w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
        pts: Polygon = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    elif shape == 'ellipse':
        pts = _ellipse_points(0.0, 0.0, aspect, 1.0, rng.uniform(0, math.pi), num=int(np.clip(extent, 12, 40)))
    elif shape == 'triangle':
        base = np.deg2rad(np.array([-90.0, 30.0, 150.0]) + rng.uniform(-15, 15, size=3))
        radius = rng.uniform(0.8, 1.0, size=3)
        x, y = aspect * radius * np.cos(base), radius * np.sin(base)
        rot = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(rot), math.sin(rot)
        pts = [(xi * ca - yi * sa, xi * sa + yi * ca) for xi, yi in zip(x, y)]
    else:
        raise ValueError(f'unknown shape {shape!r}')
    arr = np.asarray(pts, dtype=np.float64)
    arr -= arr.min(axis=0)
    arr *= extent / max(float(arr.max()), 1e-6)
    return [(float(x), float(y)) for x, y in arr]


def _object_texture(rng: np.random.Generator, size: int, background_mean: np.ndarray) -> np.ndarray:
    """A float RGB fill for one object: a random colour (kept apart from the background) with texture."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(8):
        if np.linalg.norm(colour - background_mean) >= 70:
            break
        colour = rng.uniform(0, 255, size=3)
    fill = np.broadcast_to(colour, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    shade = rng.uniform(-30, 30)
    fill += shade * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    if rng.random() < 0.3:
        freq = rng.uniform(6.0, 20.0)
        phi = rng.uniform(0, math.pi)
        fill += rng.uniform(10, 30) * np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)))[..., None]
    fill += rng.normal(0.0, rng.uniform(2.0, 10.0), size=fill.shape)
    return fill


def _coco_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[Tuple[int, Polygon]]]:
    """Render one detection image; return it (uint8 HWC) and its objects as ``(category_id, polygon)``."""
    img = _coco_background(rng, size)
    cat_ids = sorted(COCO_TOY_SHAPES)
    min_extent, max_extent = 8.0, max(0.6 * size, 9.0)
    num_objects = int(rng.integers(1, 7))
    extents = np.exp(rng.uniform(math.log(min_extent), math.log(max_extent), size=num_objects))
    extents = sorted(extents.tolist(), reverse=True)  # big first, so small objects end up on top
    owner = np.full((size, size), -1, dtype=np.int32)
    full_areas: List[int] = []
    objects: List[Tuple[int, Polygon]] = []
    centres: List[Tuple[float, float, float]] = []
    for extent in extents:
        cat_id = int(cat_ids[int(rng.integers(len(cat_ids)))])
        poly = _shape_polygon(rng, COCO_TOY_SHAPES[cat_id], extent)
        arr = np.asarray(poly)
        bw, bh = arr.max(axis=0)
        for _ in range(20):
            if centres and rng.random() < 0.4:  # place it on top of an earlier object to get overlaps
                ox, oy, oext = centres[int(rng.integers(len(centres)))]
                cx, cy = ox + rng.uniform(-0.5, 0.5) * oext, oy + rng.uniform(-0.5, 0.5) * oext
                x0, y0 = cx - bw / 2, cy - bh / 2
            else:
                x0, y0 = rng.uniform(0, size - bw), rng.uniform(0, size - bh)
            x0 = float(np.clip(x0, 0, size - bw))
            y0 = float(np.clip(y0, 0, size - bh))
            placed = [(x + x0, y + y0) for x, y in poly]
            mask = _poly_mask(size, size, placed)
            if mask.sum() < 12:
                continue
            # every earlier object must keep at least half of its full area visible
            covered = np.bincount(owner[mask] + 1, minlength=len(objects) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
            if all(visible[j] - covered[j] >= 0.5 * full_areas[j] for j in range(len(objects))):
                break
        else:
            continue
        fill = _object_texture(rng, size, img[mask].mean(axis=0))
        img[mask] = fill[mask]
        owner[mask] = len(objects)
        full_areas.append(int(mask.sum()))
        objects.append((cat_id, [(round(x, 2), round(y, 2)) for x, y in placed]))
        centres.append((x0 + bw / 2, y0 + bh / 2, float(extent)))
    return _to_uint8(img), objects


def _coco_split(root: Path, split_name: str, split_idx: int, num_images: int, size: int, seed: int,
                verbose: bool) -> Path:
    """Write the images and the annotation file of one split; return the annotation file's path."""
    img_dir = root / split_name
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    progress = _Progress(f'coco {split_name}', num_images, verbose)
    for index in range(num_images):
        rng = _image_rng(seed, _COCO_SUBSET, split_idx, index)
        img, objects = _coco_image(rng, size)
        image_id = index + 1
        file_name = f'{image_id:012d}.jpg'
        Image.fromarray(img, 'RGB').save(img_dir / file_name, format='JPEG', quality=_JPEG_QUALITY)
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
        for cat_id, poly in objects:
            arr = np.asarray(poly)
            x_min, y_min = arr.min(axis=0)
            x_max, y_max = arr.max(axis=0)
            annotations.append(dict(
                id=len(annotations) + 1,
                image_id=image_id,
                category_id=cat_id,
                segmentation=[[coord for point in poly for coord in point]],
                area=round(_polygon_area(poly), 2),
                bbox=[round(float(x_min), 2), round(float(y_min), 2), round(float(x_max - x_min), 2),
                      round(float(y_max - y_min), 2)],
                iscrowd=0,
            ))
        progress.step()
    progress.close()
    shape_note = ', '.join(f'{name}={COCO_TOY_SHAPES[cid]}' for cid, name in COCO_CATEGORIES
                           if cid in COCO_TOY_SHAPES)
    dataset = dict(
        info=dict(description=f'orepa_mm synthetic toy detection set ({split_name}, seed {seed}); '
                  f'shapes drawn for the used categories: {shape_note}',
                  version='1.0', year=2024),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=cid, name=name, supercategory='toy') for cid, name in COCO_CATEGORIES],
    )
    ann_dir = root / 'annotations'
    ann_dir.mkdir(parents=True, exist_ok=True)
    ann_file = ann_dir / f'instances_{split_name}.json'
    ann_file.write_text(json.dumps(dataset, separators=(',', ':')) + '\n')
    return ann_file


def make_coco(out_dir: PathLike, num_train: int = 48, num_val: int = 16, size: int = 160, seed: int = 0, *,
              overwrite: bool = False, verbose: bool = False) -> Dict[str, Path]:
    """Write a COCO-format detection / instance segmentation set into ``out_dir`` (its ``data_root``).

    Args:
        out_dir: folder to create; it becomes ``<out_dir>/train2017``, ``<out_dir>/val2017`` and
            ``<out_dir>/annotations/instances_{train2017,val2017}.json``.
        num_train: number of training images.
        num_val: number of validation images.
        size: side of the square images in pixels.
        seed: non-negative seed; the same seed gives byte-identical files.
        overwrite: replace ``out_dir`` when it exists and is not empty (otherwise ``FileExistsError``).
        verbose: print a progress counter to stderr.

    Returns:
        Paths ``root``, ``train_img_dir``, ``val_img_dir``, ``train_ann_file`` and ``val_ann_file``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError('image counts must be >= 0')
    if size < 32:
        raise ValueError(f'size must be at least 32 pixels, got {size}')
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed}')
    root = Path(out_dir)
    with _atomic_dir(root, overwrite) as tmp:
        for split_idx, (split, num) in enumerate((('train2017', num_train), ('val2017', num_val))):
            _coco_split(tmp, split, split_idx, num, size, seed, verbose)
    return dict(root=root, train_img_dir=root / 'train2017', val_img_dir=root / 'val2017',
                train_ann_file=root / 'annotations' / 'instances_train2017.json',
                val_ann_file=root / 'annotations' / 'instances_val2017.json')


# --------------------------------------------------------------------------------------------------
# Cityscapes-format semantic segmentation set
# --------------------------------------------------------------------------------------------------
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
    label[_poly_mask(h, w, sidewalk)] = _T['sidewalk']
    road = [(vx - half_top, horizon), (vx + half_top, horizon), (road_right, h), (road_left, h)]
    label[_poly_mask(h, w, road)] = _T['road']

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
        label[_poly_mask(h, w, [(cx - 1.5, y), (cx + 1.5, y), (cx + 1.5, y - trunk_h), (cx - 1.5, y - trunk_h)])] = \
            _T['vegetation']
        crown_pts = _ellipse_points(cx, y - trunk_h, crown * rng.uniform(0.8, 1.4), crown)
        label[_poly_mask(h, w, crown_pts)] = _T['vegetation']

    # poles with traffic signs
    for _ in range(int(rng.integers(0, 3))):
        y = rng.uniform(horizon + 0.1 * (h - horizon), h * 0.95)
        cx = ground_x(y, -0.12 if rng.random() < 0.5 else 1.12)
        s = (y - horizon) / max(h - horizon, 1)
        pole_h = (0.2 + s) * h * 0.6
        pw = max(1.0, 2.5 * s)
        label[_poly_mask(h, w, [(cx - pw, y), (cx + pw, y), (cx + pw, y - pole_h), (cx - pw, y - pole_h)])] = \
            _T['pole']
        if rng.random() < 0.7:
            sz = max(3.0, 10 * s)
            sign = [(cx - sz, y - pole_h), (cx + sz, y - pole_h), (cx + sz, y - pole_h + sz),
                    (cx - sz, y - pole_h + sz)]
            label[_poly_mask(h, w, sign)] = _T['traffic sign']

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
            mask = _poly_mask(h, w, body)
            colour = rng.choice(np.array([[20, 20, 120], [0, 0, 150], [40, 40, 170], [10, 30, 110]]))
            colour = colour + rng.normal(0, 10, size=3)
        else:
            cx = ground_x(y, -0.1 if rng.random() < 0.5 else 1.1) + rng.uniform(-2, 2)
            ph = max(6.0, s * h * rng.uniform(0.35, 0.5))
            pw = ph * rng.uniform(0.22, 0.32)
            body = [(cx - pw / 2, y), (cx + pw / 2, y), (cx + pw / 2, y - ph * 0.8), (cx - pw / 2, y - ph * 0.8)]
            head = _ellipse_points(cx, y - ph * 0.88, ph * 0.09, ph * 0.11, num=12)
            mask = _poly_mask(h, w, body) | _poly_mask(h, w, head)
            colour = np.array(_CITY_BASE_COLOURS[_T['person']], dtype=np.float64) + rng.normal(0, 25, size=3)
        if mask.sum() == 0:
            continue
        label[mask] = _T[kind]
        instances.append((mask, colour))

    # ignored pixels: an ego-vehicle bonnet at the bottom and a few unlabelled blobs
    if rng.random() < 0.6:
        depth = h * rng.uniform(0.04, 0.1)
        bonnet = _ellipse_points(w / 2, h + depth * 0.5, w * 0.7, depth * 1.5, num=40)
        label[_poly_mask(h, w, bonnet)] = IGNORE_INDEX
    for _ in range(int(rng.integers(1, 3))):
        bx, by = rng.uniform(0, w), rng.uniform(horizon * 0.5, h)
        r = rng.uniform(1.5, 0.05 * h + 2)
        label[_poly_mask(h, w, _ellipse_points(bx, by, r * rng.uniform(0.6, 1.6), r, num=12))] = IGNORE_INDEX
    return label, instances


def _city_image(rng: np.random.Generator, label: np.ndarray,
                instances: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Colour a train-id map: a class-specific base colour, per-class texture, lighting and noise."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), dtype=np.float64)
    blotch = _upsampled_noise(rng, h, w, 6, 1)
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
    return _to_uint8(img)


def make_cityscapes(out_dir: PathLike, num_train: int = 24, num_val: int = 8,
                    size_hw: Tuple[int, int] = (128, 256), seed: int = 0, *,
                    overwrite: bool = False, verbose: bool = False) -> Dict[str, Path]:
    """Write a Cityscapes-format semantic segmentation set into ``out_dir`` (its ``data_root``).

    Args:
        out_dir: folder to create; it gets ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
            ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (train ids, 255 = ignore).
        num_train: number of training images (spread over the cities in ``CITY_TRAIN_CITIES``).
        num_val: number of validation images (cities in ``CITY_VAL_CITIES``).
        size_hw: image ``(height, width)`` in pixels.
        seed: non-negative seed; the same seed gives byte-identical files.
        overwrite: replace ``out_dir`` when it exists and is not empty (otherwise ``FileExistsError``).
        verbose: print a progress counter to stderr.

    Returns:
        Paths ``root``, ``train_img_dir``, ``val_img_dir``, ``train_seg_dir`` and ``val_seg_dir``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError('image counts must be >= 0')
    h, w = (int(v) for v in size_hw)
    if h < 32 or w < 32:
        raise ValueError(f'size_hw must be at least 32x32, got {h}x{w}')
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed}')
    root = Path(out_dir)
    with _atomic_dir(root, overwrite) as tmp:
        for split_idx, (split, num, cities) in enumerate((('train', num_train, CITY_TRAIN_CITIES),
                                                          ('val', num_val, CITY_VAL_CITIES))):
            progress = _Progress(f'cityscapes {split}', num, verbose)
            for index in range(num):
                rng = _image_rng(seed, _CITY_SUBSET, split_idx, index)
                city = cities[index % len(cities)]
                stem = f'{city}_{index // len(cities):06d}_000019'
                img_dir = tmp / 'leftImg8bit' / split / city
                seg_dir = tmp / 'gtFine' / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                seg_dir.mkdir(parents=True, exist_ok=True)
                label, instances = _city_label(rng, h, w)
                img = _city_image(rng, label, instances)
                Image.fromarray(img, 'RGB').save(img_dir / f'{stem}_leftImg8bit.png', format='PNG',
                                                 compress_level=_PNG_COMPRESS_LEVEL)
                Image.fromarray(label, 'L').save(seg_dir / f'{stem}_gtFine_labelTrainIds.png', format='PNG',
                                                 compress_level=_PNG_COMPRESS_LEVEL)
                progress.step()
            progress.close()
    return dict(root=root, train_img_dir=root / 'leftImg8bit' / 'train', val_img_dir=root / 'leftImg8bit' / 'val',
                train_seg_dir=root / 'gtFine' / 'train', val_seg_dir=root / 'gtFine' / 'val')


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _parse_hw(text: str) -> Tuple[int, int]:
    """Parse ``HxW`` (e.g. ``128x256``) into ``(height, width)``."""
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'expected HEIGHTxWIDTH such as 128x256, got {text!r}') from err
    return h, w


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected a non-negative integer, got {text!r}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Write small synthetic COCO-format and Cityscapes-format '
                                     'data sets (deterministic for a given seed).')
    parser.add_argument('--out', default='data/toy', help='output folder (default: data/toy)')
    parser.add_argument('--seed', type=_non_negative, default=0, help='random seed (default: 0)')
    parser.add_argument('--coco-train', type=_non_negative, default=48, help='COCO training images (48)')
    parser.add_argument('--coco-val', type=_non_negative, default=16, help='COCO validation images (16)')
    parser.add_argument('--coco-size', type=int, default=160, help='side of the square COCO images (160)')
    parser.add_argument('--city-train', type=_non_negative, default=24, help='Cityscapes training images (24)')
    parser.add_argument('--city-val', type=_non_negative, default=8, help='Cityscapes validation images (8)')
    parser.add_argument('--city-size', type=_parse_hw, default=(128, 256),
                        help='Cityscapes image size HEIGHTxWIDTH (128x256)')
    parser.add_argument('--only', choices=('coco', 'cityscapes'), help='write only one of the two sets')
    parser.add_argument('--force', action='store_true', help='replace existing non-empty output folders')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    targets = {'coco': out / 'coco', 'cityscapes': out / 'cityscapes'}
    wanted = [args.only] if args.only else ['coco', 'cityscapes']
    if not args.force:
        busy = [str(targets[name]) for name in wanted if targets[name].exists()
                and (not targets[name].is_dir() or _is_nonempty_dir(targets[name]))]
        if busy:
            print(f'error: output folder(s) already exist and are not empty: {", ".join(busy)}; '
                  'pass --force to replace them', file=sys.stderr)
            return 1
    start = time.perf_counter()
    summary = []
    try:
        if 'coco' in wanted:
            paths = make_coco(targets['coco'], args.coco_train, args.coco_val, args.coco_size, args.seed,
                              overwrite=args.force, verbose=True)
            num_instances = [len(json.loads(paths[key].read_text())['annotations'])
                             for key in ('train_ann_file', 'val_ann_file')]
            summary.append(f'coco {args.coco_train}+{args.coco_val} images '
                           f'({num_instances[0]}+{num_instances[1]} instances) in {paths["root"]}')
        if 'cityscapes' in wanted:
            paths = make_cityscapes(targets['cityscapes'], args.city_train, args.city_val, args.city_size,
                                    args.seed, overwrite=args.force, verbose=True)
            summary.append(f'cityscapes {args.city_train}+{args.city_val} images in {paths["root"]}')
    except (FileExistsError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'make_toy_data: seed {args.seed}: {"; ".join(summary)} ({time.perf_counter() - start:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
