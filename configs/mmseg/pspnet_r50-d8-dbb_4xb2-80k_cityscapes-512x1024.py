# pspnet R50-D8 on Cityscapes with a DBB ResNetV1c-50: the paper's offline re-param baseline.
# DBBResNetV1c = mmseg's ResNetV1c whose 3x3 convs (deep stem included) are
# Diverse Branch Blocks as published (BNs inside the branches, BN-and-pad, of the
# model's SyncBN type); 1x1 convs stay plain conv + BN.  The open-mmlab ImageNet
# weights of the base config load function-preservingly, so it starts from the
# same weights as its plain and OREPA siblings.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='DBBResNetV1c'))
