"""Evaluate a checkpoint of an mmdet, mmseg or mmpretrain config with mmengine's Runner.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
    bash tools/dist_test.sh CONFIG CHECKPOINT 2
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mmengine.runner import Runner

from orepa_mm.cli import EXIT_STATUS_HELP, shutdown_distributed, tool_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import add_runner_args, runner_config  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file')
    return parser.parse_args(argv)


@tool_main('test')
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = runner_config(args)
    cfg.load_from = args.checkpoint
    try:
        Runner.from_cfg(cfg).test()
    finally:
        shutdown_distributed()


if __name__ == '__main__':
    raise SystemExit(main())
