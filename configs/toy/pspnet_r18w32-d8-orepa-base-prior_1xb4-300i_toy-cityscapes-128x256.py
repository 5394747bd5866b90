# OREPA ablation (components): the linearized DBB branches plus the frequency-prior filter.
_base_ = './pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', branches=('origin', 'avg', '1x1_kxk', '1x1', 'prior'))))
