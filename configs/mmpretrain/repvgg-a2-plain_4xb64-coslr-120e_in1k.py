# RepVGG-A2 on ImageNet-1k (offline re-param: 3x3 conv+BN, 1x1 conv+BN and an identity BN per
# block), with the OREPA authors' recipe.  Paper top-1: 76.48.
_base_ = ['mmpretrain::_base_/models/repvgg-A0_in1k.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(backbone=dict(arch='A2'), head=dict(in_channels=1408))
