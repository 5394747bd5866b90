"""Train an mmdet or mmseg config with mmengine's Runner (for users without mim).

    python tools/train.py configs/toy/faster-rcnn_r18w16-orepa_fpn_300i_toy-coco.py
    python -m torch.distributed.run --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch
"""
import argparse
import os
import sys

import torch
from mmengine.runner import Runner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runner_common import add_common_args, load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from a checkpoint, or the latest one in work_dir if no path is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = load_config(args)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.launcher != 'none' and not torch.cuda.is_available():
        setup_cpu_distributed(cfg)
    Runner.from_cfg(cfg).train()


def setup_cpu_distributed(cfg) -> None:
    """Distributed training without GPUs: mmengine 0.10.7's ``init_dist``
    calls ``torch.cuda.set_device`` and wraps the model with
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


if __name__ == '__main__':
    main()
