"""The toy COCO-format detection / instance segmentation set.

Every image shows 1-5 objects of three shapes (rectangle, ellipse, triangle) with random colours (far
from the background's), sizes from 15 % to 50 % of the image side, aspect ratios from 1:2 to 2:1 and partial overlaps
(each object keeps at least 70 % of its area in view), on a calm background (gradient, smooth blotches,
noise).  Each object is annotated with its full polygon, the polygon's
bounding box and area, ``iscrowd=0``.  The json declares all 80 COCO categories with their usual ids and
names, and the shapes use the first three of them (rectangle -> ``person`` (id 1), ellipse -> ``bicycle``
(id 2), triangle -> ``car`` (id 3)).  This way mmdet's ``CocoDataset`` with its default 80-class
metainfo, and any stock COCO config, read the set without changes (label ``i`` is the i-th COCO class);
a config may instead set ``metainfo=dict(classes=COCO_TOY_CLASSES)`` and a 3-class head.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from .common import (
    COCO_SUBSET,
    JPEG_QUALITY,
    PathLike,
    Polygon,
    atomic_dir,
    calm_background,
    check_split_args,
    image_rng,
    polygon_area,
    polygon_mask,
    progress,
    shape_polygon,
    to_uint8,
    write_stamp,
)

__all__ = ['COCO_CATEGORIES', 'COCO_TOY_SHAPES', 'COCO_TOY_CLASSES', 'COCO_DEFAULT_SPLITS', 'COCO_DEFAULT_SIZE',
           'make_coco']

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
#: Objects per image: 1 to MAX_OBJECTS; each keeps at least MIN_VISIBLE of its area in view.
MAX_OBJECTS = 5
MIN_VISIBLE = 0.7
#: Default (train, val) image counts and image side: what the toy configs are tuned for.
COCO_DEFAULT_SPLITS = (600, 60)
COCO_DEFAULT_SIZE = 128


def _object_texture(rng: np.random.Generator, size: int, background_mean: np.ndarray) -> np.ndarray:
    """A float RGB fill for one object: a random colour (kept apart from the background) with texture."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(16):
        if np.linalg.norm(colour - background_mean) >= 100:
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
    img = calm_background(rng, size)
    cat_ids = sorted(COCO_TOY_SHAPES)
    min_extent, max_extent = max(0.15 * size, 6.0), max(0.5 * size, 8.0)
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    extents = np.exp(rng.uniform(math.log(min_extent), math.log(max_extent), size=num_objects))
    extents = sorted(extents.tolist(), reverse=True)  # big first, so small objects end up on top
    owner = np.full((size, size), -1, dtype=np.int32)
    full_areas: List[int] = []
    objects: List[Tuple[int, Polygon]] = []
    centres: List[Tuple[float, float, float]] = []
    for extent in extents:
        cat_id = int(cat_ids[int(rng.integers(len(cat_ids)))])
        poly = shape_polygon(rng, COCO_TOY_SHAPES[cat_id], extent)
        arr = np.asarray(poly)
        bw, bh = arr.max(axis=0)
        for _ in range(20):
            if centres and rng.random() < 0.25:  # place it on top of an earlier object to get overlaps
                ox, oy, oext = centres[int(rng.integers(len(centres)))]
                cx, cy = ox + rng.uniform(-0.5, 0.5) * oext, oy + rng.uniform(-0.5, 0.5) * oext
                x0, y0 = cx - bw / 2, cy - bh / 2
            else:
                x0, y0 = rng.uniform(0, size - bw), rng.uniform(0, size - bh)
            x0 = float(np.clip(x0, 0, size - bw))
            y0 = float(np.clip(y0, 0, size - bh))
            placed = [(x + x0, y + y0) for x, y in poly]
            mask = polygon_mask(size, size, placed)
            if mask.sum() < 12:
                continue
            # every earlier object must keep most of its full area visible
            covered = np.bincount(owner[mask] + 1, minlength=len(objects) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
            if all(visible[j] - covered[j] >= MIN_VISIBLE * full_areas[j] for j in range(len(objects))):
                break
        else:
            continue
        fill = _object_texture(rng, size, img[mask].mean(axis=0))
        img[mask] = fill[mask]
        owner[mask] = len(objects)
        full_areas.append(int(mask.sum()))
        objects.append((cat_id, [(round(x, 2), round(y, 2)) for x, y in placed]))
        centres.append((x0 + bw / 2, y0 + bh / 2, float(extent)))
    return to_uint8(img), objects


def _annotation(ann_id: int, image_id: int, cat_id: int, poly: Polygon) -> dict:
    """The COCO annotation of one object: its polygon, the polygon's box and area."""
    arr = np.asarray(poly)
    x_min, y_min = arr.min(axis=0)
    x_max, y_max = arr.max(axis=0)
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=cat_id,
        segmentation=[[coord for point in poly for coord in point]],
        area=round(polygon_area(poly), 2),
        bbox=[round(float(x_min), 2), round(float(y_min), 2), round(float(x_max - x_min), 2),
              round(float(y_max - y_min), 2)],
        iscrowd=0,
    )


def _coco_split(root: Path, split_name: str, split_idx: int, num_images: int, size: int, seed: int,
                verbose: bool) -> Path:
    """Write the images and the annotation file of one split; return the annotation file's path."""
    img_dir = root / split_name
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    with progress(f'coco {split_name}', num_images, verbose) as advance:
        for index in range(num_images):
            rng = image_rng(seed, COCO_SUBSET, split_idx, index)
            img, objects = _coco_image(rng, size)
            image_id = index + 1
            file_name = f'{image_id:012d}.jpg'
            Image.fromarray(img, 'RGB').save(img_dir / file_name, format='JPEG', quality=JPEG_QUALITY)
            images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
            for cat_id, poly in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, cat_id, poly))
            advance()
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


def make_coco(out_dir: PathLike, num_train: int = COCO_DEFAULT_SPLITS[0], num_val: int = COCO_DEFAULT_SPLITS[1],
              size: int = COCO_DEFAULT_SIZE, seed: int = 0, *,
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
        verbose: log each split (and show a progress bar on a terminal).

    Returns:
        Paths ``root``, ``train_img_dir``, ``val_img_dir``, ``train_ann_file`` and ``val_ann_file``.
    """
    check_split_args(num_train, num_val, seed)
    if size < 32:
        raise ValueError(f'size must be at least 32 pixels, got {size}')
    root = Path(out_dir)
    with atomic_dir(root, overwrite) as tmp:
        for split_idx, (split, num) in enumerate((('train2017', num_train), ('val2017', num_val))):
            _coco_split(tmp, split, split_idx, num, size, seed, verbose)
        write_stamp(tmp, 'coco', num_train=num_train, num_val=num_val, size=size, seed=seed)
    return dict(root=root, train_img_dir=root / 'train2017', val_img_dir=root / 'val2017',
                train_ann_file=root / 'annotations' / 'instances_train2017.json',
                val_ann_file=root / 'annotations' / 'instances_val2017.json')
