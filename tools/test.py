"""Evaluate a checkpoint of an mmdet or mmseg config with mmengine's Runner.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
"""
import argparse
import os
import sys

from mmengine.runner import Runner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runner_common import add_common_args, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file')
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    Runner.from_cfg(cfg).test()


if __name__ == '__main__':
    main()
