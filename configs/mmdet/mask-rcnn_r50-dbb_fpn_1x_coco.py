# mask-rcnn R50-FPN 1x on COCO with a DBB ResNet-50: the paper's offline re-param baseline.
# DBBResNet = mmdet's ResNet whose 3x3 convs are Diverse Branch Blocks as published
# (BNs inside the branches, BN-and-pad); 1x1 convs and the 7x7 stem stay plain
# conv + BN.  The torchvision ImageNet weights of the base config load
# function-preservingly (origin branch = the weight, other branches at scale 0),
# so it starts from the same weights as its plain and OREPA siblings.
# norm_eval=True (base config) keeps every BN in eval mode, DBB's inner ones too.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='DBBResNet'))
