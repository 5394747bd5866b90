# Toy PSPNet with a DBB dilated backbone (see the _plain config).
_base_ = './pspnet_r18-d8_toy-cityscapes_plain.py'
model = dict(backbone=dict(type='DBBResNetV1c'))
