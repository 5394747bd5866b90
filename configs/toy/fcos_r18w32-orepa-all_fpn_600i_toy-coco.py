# Toy FCOS with OREPA in the backbone, the FPN and the head's stacked convs
# (shared by the three FPN levels); see the -orepa config, which this one
# follows.  The predictors (conv_cls, conv_reg, conv_centerness) stay plain.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'
model = dict(neck=dict(conv_cfg=dict(type='OREPA')), bbox_head=dict(conv_cfg=dict(type='OREPA')))
