# Toy PSPNet with OREPA in the backbone and in both heads (the PSP head's
# pyramid pooling and bottleneck, the auxiliary FCN head's conv); see the
# -orepa config, which this one follows.  The classifiers stay plain.
_base_ = './pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'
model = dict(decode_head=dict(conv_cfg=dict(type='OREPA')), auxiliary_head=dict(conv_cfg=dict(type='OREPA')))
