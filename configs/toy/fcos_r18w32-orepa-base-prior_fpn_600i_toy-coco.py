# OREPA ablation (components): the linearized DBB branches plus the frequency-prior filter.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', branches=('origin', 'avg', '1x1_kxk', '1x1', 'prior'))))
