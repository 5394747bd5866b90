# OREPA ablation (scaling): no scaling layers, the branches are summed as they are.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', scaling='none')))
