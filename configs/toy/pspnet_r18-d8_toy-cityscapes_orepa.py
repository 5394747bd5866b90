# Toy PSPNet with an OREPA dilated backbone (see the _plain config).
_base_ = './pspnet_r18-d8_toy-cityscapes_plain.py'
model = dict(backbone=dict(type='OREPAResNetV1c'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
