# Toy PSPNet with an OREPA dilated backbone (see the _plain config).
_base_ = './pspnet_r18w32-d8-plain_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(type='OREPAResNetV1c'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
