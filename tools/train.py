"""Train an mmdet, mmseg or mmpretrain config with mmengine's Runner (for users without mim).

    python tools/train.py configs/toy/fcos_r18w32-orepa_fpn_600i_toy-coco.py
    bash tools/dist_train.sh CONFIG 2          # two processes (gloo on CPU, nccl on GPUs)
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
from typing import Optional, Sequence

import torch
from mmengine.config import DictAction

from orepa_mm.cli import EXIT_STATUS_HELP, build_runner, shutdown_distributed, tool_main
from orepa_mm.config import load_config


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """The arguments tools/train.py and tools/test.py share (as in OpenMMLab's own tools)."""
    parser.add_argument('config', help='config file (mmdet, mmseg or mmpretrain)')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings, e.g. train_cfg.max_iters=10')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def runner_config(args: argparse.Namespace):
    """The config of ``args.config`` with the command line's overrides, launcher and work_dir."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.launcher != 'none' and not torch.cuda.is_available():
        setup_cpu_distributed(cfg)
    return cfg


def setup_cpu_distributed(cfg) -> None:
    """Distributed runs without GPUs: mmengine 0.10.7's ``init_dist`` calls
    ``torch.cuda.set_device`` and wraps the model with
    ``device_ids=[local_rank]``, both of which need CUDA.  Initialise a gloo
    process group here (the Runner then reuses it) and wrap without device ids."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.update(device_ids=None, broadcast_buffers=False,
                   find_unused_parameters=cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_args(parser)
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from a checkpoint, or the latest one in work_dir if no path is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    return parser.parse_args(argv)


@tool_main('train')
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = runner_config(args)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    try:
        build_runner(cfg).train()
    finally:
        shutdown_distributed()


if __name__ == '__main__':
    raise SystemExit(main())
