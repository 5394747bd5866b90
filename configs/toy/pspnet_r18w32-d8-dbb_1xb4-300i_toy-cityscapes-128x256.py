# Toy PSPNet with a DBB dilated backbone (see the _plain config): the paper's DBB
# baseline, 3x3 convs (deep stem included) as Diverse Branch Blocks with BNs of
# the model's norm type, 1x1 convs plain.
_base_ = './pspnet_r18w32-d8-plain_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(type='DBBResNetV1c'))
