# OREPA ablation (components): plus the linear depthwise-separable branch.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', branches=('origin', 'avg', '1x1_kxk', '1x1', 'prior', 'dws'))))
