"""Making sure the toy sets that the toy configs read exist and are current."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

from .cityscapes import make_cityscapes
from .coco import make_coco
from .common import GENERATOR_VERSION, PathLike, is_nonempty_dir, read_stamp
from .imagenet import make_imagenet

__all__ = ['ensure_toy_data', 'StaleToyDataError']

_MAKERS: Dict[str, Callable[..., dict]] = {'coco': make_coco, 'cityscapes': make_cityscapes, 'imagenet': make_imagenet}


class StaleToyDataError(RuntimeError):
    """A toy set on disk was written by another generator version than this one."""


def ensure_toy_data(data_root: PathLike = 'data/toy', verbose: bool = True) -> List[str]:
    """Write ``<data_root>/coco``, ``<data_root>/cityscapes`` and ``<data_root>/imagenet`` with the
    default sizes (the ones the toy configs are tuned for) where missing.

    An existing set is kept: when its stamp says another generator version
    wrote it (its images differ from this version's), :class:`StaleToyDataError`
    names the folder and how to replace it; nothing is overwritten.

    Returns:
        The names of the sets written now.
    """
    root = Path(data_root)
    written = []
    for name, make in _MAKERS.items():
        target = root / name
        if is_nonempty_dir(target):
            stamp = read_stamp(target)
            version = stamp.get('generator_version') if stamp else None
            if version != GENERATOR_VERSION:
                raise StaleToyDataError(
                    f'{target} was written by toy-data generator version {version or 1}, this is version '
                    f'{GENERATOR_VERSION}: the toy configs expect the current sets; replace it with '
                    f'`python tools/misc/make_toy_data.py --out {root} --force` (or move it away)')
            continue
        make(target, verbose=verbose)
        written.append(name)
    return written
