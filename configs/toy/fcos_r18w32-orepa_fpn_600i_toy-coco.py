# Toy FCOS with an OREPA backbone (see the _plain config).
_base_ = './fcos_r18w32-plain_fpn_600i_toy-coco.py'
model = dict(backbone=dict(type='OREPAResNet'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
