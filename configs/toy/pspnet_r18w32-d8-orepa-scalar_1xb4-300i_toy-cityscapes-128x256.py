# OREPA ablation (scaling): one learnable scale per branch instead of one per branch and channel.
_base_ = './pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', scaling='scalar')))
