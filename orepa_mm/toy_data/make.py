"""Create the toy sets where they are missing: what the demo and the
accuracy benchmark do before training."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .cityscapes import make_cityscapes
from .coco import make_coco
from .common import is_nonempty_dir

__all__ = ['ensure_toy_data']


def ensure_toy_data(data_root: str, seed: int = 0) -> List[str]:
    """Write ``<data_root>/coco`` and ``<data_root>/cityscapes`` (the generators'
    default sizes, ``seed``) unless they already hold files; return the sets written."""
    written = []
    for name, make in (('coco', make_coco), ('cityscapes', make_cityscapes)):
        target = Path(data_root) / name
        if not is_nonempty_dir(target):
            make(target, seed=seed)
            written.append(name)
    return written
