# faster-rcnn R50-FPN 1x on COCO with OREPA in the backbone and the neck.
# Every conv that the stock model builds through conv_cfg is an OREPA layer:
# the backbone (see the -orepa config) and the FPN's lateral and output convs
# (1x1 and 3x3 with bias, no norm).  The RPN head's convs and the Shared2FC
# box head (no convs) take no conv_cfg and stay plain.
# Fuse afterwards: python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR
_base_ = './faster-rcnn_r50-orepa_fpn_1x_coco.py'
model = dict(neck=dict(conv_cfg=dict(type='OREPA')))
