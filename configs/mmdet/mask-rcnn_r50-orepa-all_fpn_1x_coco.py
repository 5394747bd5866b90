# mask-rcnn R50-FPN 1x on COCO with OREPA in the backbone, the neck and the
# mask head (its four 3x3 convs).  The RPN head's conv, the Shared2FC box head
# (no convs), the mask head's deconv and predictor stay plain.
# Fuse afterwards: python tools/fuse_checkpoint.py CONFIG CHECKPOINT OUT_DIR
_base_ = './mask-rcnn_r50-orepa_fpn_1x_coco.py'
model = dict(neck=dict(conv_cfg=dict(type='OREPA')),
             roi_head=dict(mask_head=dict(conv_cfg=dict(type='OREPA'))))
