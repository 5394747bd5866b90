# Toy PSPNet with a DBB dilated backbone (see the _plain config).
_base_ = './pspnet_r18w16-d8-plain_1xb4-200i_toy-cityscapes-128x256.py'
model = dict(backbone=dict(type='DBBResNetV1c'))
