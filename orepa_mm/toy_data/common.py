"""What the toy sets share: seeded random streams, shapes, backgrounds, polygon
and noise helpers, writing a folder atomically, and progress output."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.logging import print_log
from mmengine.utils import ProgressBar
from PIL import Image, ImageDraw

PathLike = Union[str, os.PathLike]
Polygon = List[Tuple[float, float]]

#: ``subset`` coordinate of each set in :func:`image_rng`.
COCO_SUBSET = 0
CITY_SUBSET = 1
IMAGENET_SUBSET = 2
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 6
#: Version of what the generators draw; bumped whenever the images change, so
#: that data written by an older version is recognised (``read_stamp``).
GENERATOR_VERSION = 2
STAMP_FILE = 'orepa_toy_data.json'


def image_rng(seed: int, subset: int, split: int, index: int) -> np.random.Generator:
    """The random stream of one image; it depends only on its own coordinates,
    so the images of one split do not change when another split grows."""
    return np.random.default_rng([seed, subset, split, index])


def polygon_mask(height: int, width: int, points: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Rasterise a polygon into a boolean ``(height, width)`` mask."""
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                   num: Optional[int] = None) -> Polygon:
    """Vertices of an ellipse with semi-axes ``rx``, ``ry`` rotated by ``angle`` radians."""
    if num is None:
        num = int(np.clip(max(rx, ry), 12, 48))
    t = np.linspace(0.0, 2.0 * math.pi, num, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + xi * ca - yi * sa, cy + xi * sa + yi * ca) for xi, yi in zip(x, y)]


def polygon_area(points: Sequence[Tuple[float, float]]) -> float:
    """Area of a simple polygon (shoelace formula)."""
    pts = np.asarray(points, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def upsampled_noise(rng: np.random.Generator, height: int, width: int, cells: int,
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


def calm_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float RGB background: a colour gradient, smooth blotches and pixel noise.

    Kept calmer than the objects (no stripes or sharp edges), so that edges
    belong to objects and a small detector learns them in minutes.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    img += rng.uniform(0, 30) * upsampled_noise(rng, size, size, int(rng.integers(2, 6)), 3)
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), size=img.shape)
    return img


def shape_polygon(rng: np.random.Generator, shape: str, extent: float) -> Polygon:
    """A polygon of ``shape`` whose bounding box has largest side ``extent``, with its box at the origin."""
    aspect = math.exp(rng.uniform(math.log(1 / 2), math.log(2)))  # width / height
    if shape == 'rectangle':
        w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
        pts: Polygon = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    elif shape == 'ellipse':
        pts = ellipse_points(0.0, 0.0, aspect, 1.0, rng.uniform(0, math.pi), num=int(np.clip(extent, 12, 40)))
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


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round and clip a float image to ``uint8``."""
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def check_split_args(num_train: int, num_val: int, seed: int) -> None:
    """The checks every generator makes on its image counts and seed."""
    if num_train < 0 or num_val < 0:
        raise ValueError('image counts must be >= 0')
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed}')


def is_nonempty_dir(path: Path) -> bool:
    """Whether ``path`` is a folder with something in it."""
    return path.is_dir() and any(path.iterdir())


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target`` and move it to ``target`` on success.

    Raises ``FileExistsError`` before anything is written when ``target`` exists and is not an empty
    folder, unless ``overwrite`` is true.  On an error the temporary folder is removed.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f'{target} exists and is not a folder')
    if is_nonempty_dir(target) and not overwrite:
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


@contextmanager
def progress(desc: str, total: int, verbose: bool) -> Iterator[Callable[[], None]]:
    """Yield a function to call once per written image.

    Silent unless ``verbose``.  Then, on a terminal, mmengine's
    :class:`ProgressBar` runs on stderr while the images are written; at the
    end one line names the finished split (mmengine's current logger), the
    only output in a log file.
    """
    if not verbose:
        yield lambda: None
        return
    bar = ProgressBar(total, file=sys.stderr) if total and sys.stderr.isatty() else None
    try:
        yield (lambda: bar.update()) if bar is not None else (lambda: None)
    finally:
        if bar is not None:
            sys.stderr.write('\n')
    print_log(f'{desc}: {total} images', logger='current')


def write_stamp(root: Path, name: str, **params: object) -> None:
    """Record in ``root`` which generator version and parameters wrote the set."""
    stamp = dict(set=name, generator_version=GENERATOR_VERSION, **params)
    (root / STAMP_FILE).write_text(json.dumps(stamp, indent=1) + '\n')


def read_stamp(root: Path) -> Optional[dict]:
    """The stamp :func:`write_stamp` left in ``root``, or None (no stamp: an older generator)."""
    try:
        return json.loads((root / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
