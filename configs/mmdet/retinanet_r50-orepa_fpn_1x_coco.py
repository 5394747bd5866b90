# retinanet R50-FPN 1x on COCO with an OREPA ResNet-50 (online re-param).
# Train: mim train mmdet configs/mmdet/retinanet_r50-orepa_fpn_1x_coco.py
# Fuse afterwards: python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)

# OREPAResNet = mmdet's ResNet with every conv an OREPA layer (1x1 blocks,
# six-branch 3x3 blocks, the linear deep stem for the 7x7 stem).  The
# torchvision ImageNet weights load function-preservingly (origin branch).
model = dict(backbone=dict(type='OREPAResNet'))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            # The per-channel branch scales only mix branches: the BN after
            # the conv makes the block scale-invariant, so decay on them
            # would not regularise, it would just pull branches that start
            # at small scale (the prior starts at 0) towards being pruned.
            'branch_scales': dict(decay_mult=0.0),
            # The authors warn that the linear deep stem (a product of three
            # kernels) needs a smaller lr when fine-tuning from ImageNet.
            # frozen_stages=1 freezes it here; this matters if you unfreeze.
            'backbone.conv1.branches.stack': dict(lr_mult=0.1),
            # The stem's branch scales match the key above, the longest one, so
            # they need their own keys to keep decay_mult=0.0 as well.
            'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
        }))
