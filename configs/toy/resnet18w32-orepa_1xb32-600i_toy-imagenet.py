# Toy classifier with an OREPA backbone (see the _plain config): every conv an
# OREPA layer, the 7x7 stem the linear deep stem; no weight decay on the
# branch scales (they only mix branches; the BN after each conv makes the
# block scale-invariant).
_base_ = './resnet18w32-plain_1xb32-600i_toy-imagenet.py'
model = dict(backbone=dict(type='OREPAResNet'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
