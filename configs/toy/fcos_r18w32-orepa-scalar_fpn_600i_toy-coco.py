# OREPA ablation (scaling): one learnable scale per branch instead of one per branch and channel.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', scaling='scalar')))
