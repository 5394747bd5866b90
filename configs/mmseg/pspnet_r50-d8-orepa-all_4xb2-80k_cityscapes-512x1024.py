# pspnet R50-D8 on Cityscapes 512x1024, 80k iterations, with OREPA in the
# backbone and in both heads: the PSP head's pyramid-pooling 1x1 convs and
# 3x3 bottleneck, the auxiliary FCN head's 3x3 conv.  The classifiers
# (conv_seg, 1x1) are plain nn.Conv2d in mmseg.
_base_ = './pspnet_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py'
model = dict(decode_head=dict(conv_cfg=dict(type='OREPA')), auxiliary_head=dict(conv_cfg=dict(type='OREPA')))
