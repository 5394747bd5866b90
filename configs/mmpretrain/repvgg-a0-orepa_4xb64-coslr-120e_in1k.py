# OREPA-VGG-A0 on ImageNet-1k: RepVGG-A0 whose 3x3 branches are OREPA blocks, with the OREPA
# authors' recipe.  Paper top-1: 73.04 (RepVGG-A0: 72.41).
# As in the authors' OREPA-VGG, the 3x3 block has the origin, average, frequency-prior, 1x1-kxk and
# depthwise-separable branches (no inner 1x1: the RepVGG block has a 1x1 branch of its own), and
# the 1x1 branch, left with its origin alone, stays a plain conv.
_base_ = './repvgg-a0-plain_4xb64-coslr-120e_in1k.py'
model = dict(backbone=dict(conv_cfg=dict(type='OREPA', branches=('origin', 'avg', 'prior', '1x1_kxk', 'dws'))))
