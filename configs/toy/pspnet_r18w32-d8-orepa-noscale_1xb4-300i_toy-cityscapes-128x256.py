# OREPA ablation (scaling): no scaling layers, the branches are summed as they are.
_base_ = './pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', scaling='none')))
