"""Small synthetic COCO-, Cityscapes- and ImageNet-format data sets for CPU smoke training.

Everything is drawn from ``numpy.random.default_rng`` seeded from ``seed`` (each image from its own
``[seed, subset, split, index]`` stream), so one seed always gives byte-identical files, and the images of
one split do not change when the size of the other split changes.

Layout written by :func:`make_coco`, :func:`make_cityscapes` and :func:`make_imagenet` (the command
line ``tools/misc/make_toy_data.py --out data/toy`` writes all three under ``data/toy``)::

    coco/train2017/000000000001.jpg ...
    coco/val2017/000000000001.jpg ...
    coco/annotations/instances_train2017.json
    coco/annotations/instances_val2017.json
    cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png
    imagenet/train/<class>/<class>_000001.JPEG ...
    imagenet/val/ILSVRC2012_val_00000001.JPEG ...
    imagenet/meta/{train,val}.txt

The sets are described in :mod:`.coco`, :mod:`.cityscapes` and :mod:`.imagenet`.  This module needs Pillow, which
``import orepa_mm`` does not: import it as ``orepa_mm.toy_data``.
"""
from .cityscapes import (
    CITY_DEFAULT_SIZE,
    CITY_DEFAULT_SPLITS,
    CITY_TRAIN_CITIES,
    CITY_VAL_CITIES,
    CITYSCAPES_TRAIN_IDS,
    IGNORE_INDEX,
    make_cityscapes,
)
from .coco import COCO_CATEGORIES, COCO_DEFAULT_SIZE, COCO_DEFAULT_SPLITS, COCO_TOY_CLASSES, COCO_TOY_SHAPES, make_coco
from .common import is_nonempty_dir
from .ensure import StaleToyDataError, ensure_toy_data
from .imagenet import IMAGENET_DEFAULT_SIZE, IMAGENET_DEFAULT_SPLITS, IMAGENET_TOY_CLASSES, make_imagenet

__all__ = ['make_coco', 'make_cityscapes', 'make_imagenet', 'ensure_toy_data', 'StaleToyDataError', 'is_nonempty_dir',
           'COCO_DEFAULT_SPLITS', 'COCO_DEFAULT_SIZE', 'CITY_DEFAULT_SPLITS', 'CITY_DEFAULT_SIZE',
           'IMAGENET_DEFAULT_SPLITS', 'IMAGENET_DEFAULT_SIZE', 'IMAGENET_TOY_CLASSES',
           'COCO_CATEGORIES', 'COCO_TOY_SHAPES',
           'COCO_TOY_CLASSES', 'CITYSCAPES_TRAIN_IDS', 'IGNORE_INDEX', 'CITY_TRAIN_CITIES', 'CITY_VAL_CITIES']
