# deeplabv3plus R50-D8 on Cityscapes 512x1024, 80k iterations, with OREPA in
# the backbone and in both heads: the depthwise-separable ASPP head (image
# pool, dilated depthwise 3x3 + pointwise 1x1 convs, bottlenecks, the 1x1
# low-level projection) and the auxiliary FCN head.  The classifiers
# (conv_seg) are plain nn.Conv2d in mmseg.
_base_ = './deeplabv3plus_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py'
model = dict(decode_head=dict(conv_cfg=dict(type='OREPA')), auxiliary_head=dict(conv_cfg=dict(type='OREPA')))
