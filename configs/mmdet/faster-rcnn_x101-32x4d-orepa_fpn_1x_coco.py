# faster-rcnn ResNeXt-101 32x4d FPN 1x on COCO with an OREPA backbone: the
# stock config with conv_cfg swapped, so mmdet's own ResNeXt builds OREPA
# layers (grouped 3x3 blocks with 32 groups, 1x1 blocks, the linear deep
# stem).  open-mmlab://resnext101_32x4d loads into the origin branches, so
# the model starts as the ImageNet ResNeXt.  Optimizer settings as in
# faster-rcnn_r50-orepa_fpn_1x_coco.py (no decay on the branch scales, a
# 0.1 lr multiplier on the linear deep stem, frozen by frozen_stages=1).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(conv_cfg=dict(type='OREPA')))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'branch_scales': dict(decay_mult=0.0), 'backbone.conv1.branches.stack': dict(lr_mult=0.1),
    # mmengine applies the longest matching key only: the stem's branch scales keep decay_mult=0.0 here.
    'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
}))
