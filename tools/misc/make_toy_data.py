"""Write the small synthetic COCO-, Cityscapes- and ImageNet-format data sets (deterministic for a given seed).

    python tools/misc/make_toy_data.py --out data/toy [--seed 0] [--coco-train 600 --coco-val 60 --coco-size 128]
        [--city-train 120 --city-val 30 --city-size 128x256] [--imagenet-train 1200 --imagenet-val 600
        --imagenet-size 64] [--only coco|cityscapes|imagenet] [--force]

The sets and their layout are described in :mod:`orepa_mm.toy_data`, whose
``make_coco``, ``make_cityscapes`` and ``make_imagenet`` other code calls directly.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, log, tool_main
from orepa_mm.toy_data import (
    CITY_DEFAULT_SIZE,
    CITY_DEFAULT_SPLITS,
    COCO_DEFAULT_SIZE,
    COCO_DEFAULT_SPLITS,
    IMAGENET_DEFAULT_SIZE,
    IMAGENET_DEFAULT_SPLITS,
    is_nonempty_dir,
    make_cityscapes,
    make_coco,
    make_imagenet,
)

PROG = 'make_toy_data'
SETS = ('coco', 'cityscapes', 'imagenet')


def parse_hw(text: str) -> Tuple[int, int]:
    """Parse ``HxW`` (e.g. ``128x256``) into ``(height, width)``."""
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'expected HEIGHTxWIDTH such as 128x256, got {text!r}') from err
    return h, w


def non_negative(text: str) -> int:
    """Parse a non-negative integer."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'expected a non-negative integer, got {text!r}') from err
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected a non-negative integer, got {text!r}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0], epilog=EXIT_STATUS_HELP)
    parser.add_argument('--out', default='data/toy', help='output folder (default: data/toy)')
    parser.add_argument('--seed', type=non_negative, default=0, help='random seed (default: 0)')
    counts = (('--coco-train', COCO_DEFAULT_SPLITS[0], 'COCO training'),
              ('--coco-val', COCO_DEFAULT_SPLITS[1], 'COCO validation'),
              ('--city-train', CITY_DEFAULT_SPLITS[0], 'Cityscapes training'),
              ('--city-val', CITY_DEFAULT_SPLITS[1], 'Cityscapes validation'),
              ('--imagenet-train', IMAGENET_DEFAULT_SPLITS[0], 'ImageNet-format training'),
              ('--imagenet-val', IMAGENET_DEFAULT_SPLITS[1], 'ImageNet-format validation'))
    for flag, default, what in counts:
        parser.add_argument(flag, type=non_negative, default=default, help=f'{what} images (%(default)s)')
    parser.add_argument('--coco-size', type=int, default=COCO_DEFAULT_SIZE,
                        help='side of the square COCO images (%(default)s)')
    parser.add_argument('--city-size', type=parse_hw, default=CITY_DEFAULT_SIZE,
                        help='Cityscapes image size HEIGHTxWIDTH (128x256)')
    parser.add_argument('--imagenet-size', type=int, default=IMAGENET_DEFAULT_SIZE,
                        help='side of the square ImageNet-format images (%(default)s)')
    parser.add_argument('--only', choices=SETS, help='write only one of the sets')
    parser.add_argument('--force', action='store_true', help='replace existing non-empty output folders')
    return parser.parse_args(argv)


@tool_main(PROG)
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Write the sets that ``argv`` asks for; nothing when an output folder is in the way."""
    args = parse_args(argv)
    out = Path(args.out)
    targets = {name: out / name for name in SETS}
    wanted = [args.only] if args.only else list(SETS)
    if not args.force:
        busy = [str(targets[name]) for name in wanted if targets[name].exists()
                and (not targets[name].is_dir() or is_nonempty_dir(targets[name]))]
        if busy:
            raise ToolError(f'output folder(s) already exist and are not empty: {", ".join(busy)}; '
                            'pass --force to replace them')
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
        if 'imagenet' in wanted:
            paths = make_imagenet(targets['imagenet'], args.imagenet_train, args.imagenet_val, args.imagenet_size,
                                  args.seed, overwrite=args.force, verbose=True)
            summary.append(f'imagenet {args.imagenet_train}+{args.imagenet_val} images in {paths["root"]}')
    except (FileExistsError, ValueError) as err:
        raise ToolError(str(err)) from err
    log(f'{PROG}: seed {args.seed}: {"; ".join(summary)} ({time.perf_counter() - start:.1f} s)')


if __name__ == '__main__':
    raise SystemExit(main())
