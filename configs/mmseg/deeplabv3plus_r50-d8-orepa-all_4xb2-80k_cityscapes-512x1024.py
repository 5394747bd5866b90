# deeplabv3plus R50-D8 on Cityscapes 512x1024, 80k iterations, with OREPA in
# the backbone and in both heads: in the depthwise-separable ASPP head the
# image-pool and dilation-1 1x1 convs, the 3x3 bottleneck and the 1x1
# low-level projection; the auxiliary FCN head's conv.  mmseg builds the
# head's depthwise-separable convs (dilated ASPP branches, sep_bottleneck)
# without its conv_cfg, so they stay plain, as do the classifiers (conv_seg).
_base_ = './deeplabv3plus_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py'
model = dict(decode_head=dict(conv_cfg=dict(type='OREPA')), auxiliary_head=dict(conv_cfg=dict(type='OREPA')))
