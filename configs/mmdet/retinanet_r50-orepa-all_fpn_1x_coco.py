# retinanet R50-FPN 1x on COCO with OREPA in the backbone, the neck and the head:
# the FPN's convs and the RetinaHead's stacked 3x3 convs (shared by the five
# FPN levels: one kernel generation per step serves all five).  The class and
# box predictors (retina_cls, retina_reg) are plain nn.Conv2d in mmdet.
# Fuse afterwards: python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR
_base_ = './retinanet_r50-orepa_fpn_1x_coco.py'
model = dict(neck=dict(conv_cfg=dict(type='OREPA')), bbox_head=dict(conv_cfg=dict(type='OREPA')))
