"""The toy ImageNet-format classification set.

Each image shows one large object (its side 45 % to 75 % of the image's) and up to two small
distractors (15 % to 30 %), on the detection set's calm background.  The class is the large object's
shape (rectangle, ellipse, triangle) and fill (``solid``: a shaded colour; ``striped``: the same with
sharp stripes of random frequency and direction), six classes in all; distractors take any shape and
fill.  A classifier must therefore find the largest object and read both its outline and its texture,
which a slim ResNet learns in minutes on a CPU without reaching 100 %.

Layout (mmpretrain's ``ImageNet`` dataset, ``split='train'`` / ``'val'``, reads it as it is)::

    train/<class>/<class>_000001.JPEG ...
    val/ILSVRC2012_val_00000001.JPEG ...
    meta/train.txt    # "<class>/<class>_000001.JPEG <label>" per line
    meta/val.txt      # "ILSVRC2012_val_00000001.JPEG <label>" per line

Labels are indices into :data:`IMAGENET_TOY_CLASSES`; configs pass those names as
``metainfo=dict(classes=...)``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from .common import (
    IMAGENET_SUBSET,
    JPEG_QUALITY,
    PathLike,
    atomic_dir,
    calm_background,
    check_split_args,
    image_rng,
    polygon_mask,
    progress,
    shape_polygon,
    to_uint8,
    write_stamp,
)

__all__ = ['IMAGENET_TOY_CLASSES', 'IMAGENET_DEFAULT_SPLITS', 'IMAGENET_DEFAULT_SIZE', 'make_imagenet']

_SHAPES = ('rectangle', 'ellipse', 'triangle')
_FILLS = ('solid', 'striped')
#: The class names, label order: ``<shape>_<fill>``.
IMAGENET_TOY_CLASSES: Tuple[str, ...] = tuple(f'{shape}_{fill}' for shape in _SHAPES for fill in _FILLS)
#: Default (train, val) image counts and image side: what the toy classifier config is tuned for.
IMAGENET_DEFAULT_SPLITS = (1200, 600)
IMAGENET_DEFAULT_SIZE = 64
MAX_DISTRACTORS = 2


def _fill(rng: np.random.Generator, size: int, striped: bool, background_mean: np.ndarray) -> np.ndarray:
    """A float RGB fill: a colour kept apart from the background, a shading ramp, stripes if
    ``striped`` (strong enough to see at the toy resolution), pixel noise."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(16):
        if np.linalg.norm(colour - background_mean) >= 100:
            break
        colour = rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    fill = np.broadcast_to(colour, (size, size, 3)).copy()
    fill += rng.uniform(-30, 30) * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    if striped:
        freq, phi = rng.uniform(5.0, 10.0), rng.uniform(0, math.pi)
        wave = np.sign(np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi))))
        fill += rng.uniform(45, 70) * wave[..., None]
    fill += rng.normal(0.0, rng.uniform(2.0, 8.0), size=fill.shape)
    return fill


def _paste(rng: np.random.Generator, img: np.ndarray, shape: str, striped: bool, extent: float,
           avoid: np.ndarray) -> np.ndarray:
    """Draw one object in place, preferring spots that cover little of ``avoid``; return its mask."""
    size = img.shape[0]
    poly = shape_polygon(rng, shape, extent)
    bw, bh = np.asarray(poly).max(axis=0)
    best = None
    for _ in range(10):
        x0, y0 = rng.uniform(0, max(size - bw, 0)), rng.uniform(0, max(size - bh, 0))
        mask = polygon_mask(size, size, [(x + x0, y + y0) for x, y in poly])
        overlap = int((mask & avoid).sum())
        if best is None or overlap < best[0]:
            best = (overlap, mask)
        if overlap <= 0.1 * avoid.sum():
            break
    mask = best[1]
    fill = _fill(rng, size, striped, img[mask].mean(axis=0) if mask.any() else img.mean(axis=(0, 1)))
    img[mask] = fill[mask]
    return mask


def _imagenet_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, int]:
    """Render one image (uint8 HWC) and return it with its label."""
    img = calm_background(rng, size)
    label = int(rng.integers(len(IMAGENET_TOY_CLASSES)))
    shape, fill = IMAGENET_TOY_CLASSES[label].split('_')
    main = _paste(rng, img, shape, fill == 'striped', rng.uniform(0.45, 0.75) * size,
                  np.zeros((size, size), dtype=bool))
    for _ in range(int(rng.integers(MAX_DISTRACTORS + 1))):
        _paste(rng, img, _SHAPES[int(rng.integers(len(_SHAPES)))], bool(rng.random() < 0.5),
               rng.uniform(0.15, 0.3) * size, main)
    return to_uint8(img), label


def _imagenet_split(root: Path, split: str, split_idx: int, num: int, size: int, seed: int,
                    verbose: bool) -> List[str]:
    """Write one split's images; return its ``meta/<split>.txt`` lines."""
    lines = []
    with progress(f'imagenet {split}', num, verbose) as advance:
        for i in range(num):
            img, label = _imagenet_image(image_rng(seed, IMAGENET_SUBSET, split_idx, i), size)
            name = IMAGENET_TOY_CLASSES[label]
            rel = f'{name}/{name}_{i + 1:06d}.JPEG' if split == 'train' else f'ILSVRC2012_val_{i + 1:08d}.JPEG'
            path = root / split / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, 'RGB').save(path, format='JPEG', quality=JPEG_QUALITY)
            lines.append(f'{rel} {label}')
            advance()
    return lines


def make_imagenet(out_dir: PathLike, num_train: int = IMAGENET_DEFAULT_SPLITS[0],
                  num_val: int = IMAGENET_DEFAULT_SPLITS[1], size: int = IMAGENET_DEFAULT_SIZE, seed: int = 0, *,
                  overwrite: bool = False, verbose: bool = False) -> Dict[str, Path]:
    """Write an ImageNet-format classification set into ``out_dir`` (its ``data_root``).

    Args:
        out_dir: folder to create, with ``train/``, ``val/`` and ``meta/{train,val}.txt``.
        num_train: number of training images.
        num_val: number of validation images.
        size: side of the square images in pixels (at least 32).
        seed: non-negative seed; the same seed gives byte-identical files.
        overwrite: replace ``out_dir`` when it exists and is not empty (otherwise ``FileExistsError``).
        verbose: log each split (and show a progress bar on a terminal).

    Returns:
        Paths ``root``, ``train_ann_file`` and ``val_ann_file``.
    """
    check_split_args(num_train, num_val, seed)
    if size < 32:
        raise ValueError(f'size must be at least 32 pixels, got {size}')
    root = Path(out_dir)
    with atomic_dir(root, overwrite) as tmp:
        (tmp / 'meta').mkdir()
        for split_idx, (split, num) in enumerate((('train', num_train), ('val', num_val))):
            lines = _imagenet_split(tmp, split, split_idx, num, size, seed, verbose)
            (tmp / split).mkdir(exist_ok=True)
            (tmp / 'meta' / f'{split}.txt').write_text(''.join(f'{line}\n' for line in lines))
        write_stamp(tmp, 'imagenet', num_train=num_train, num_val=num_val, size=size, seed=seed)
    return dict(root=root, train_ann_file=root / 'meta' / 'train.txt', val_ann_file=root / 'meta' / 'val.txt')
