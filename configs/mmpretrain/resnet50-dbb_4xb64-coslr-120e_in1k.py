# ResNet-50 on ImageNet-1k, dbb, with the OREPA authors' recipe.
# Paper top-1: 76.89.
#   mim train mmpretrain configs/mmpretrain/resnet50-dbb_4xb64-coslr-120e_in1k.py --gpus 4 --launcher pytorch
# DBBResNet: the paper's offline baseline, 3x3 convs as Diverse Branch Blocks.
# zero_init_residual=False: each residual block's last BN starts at 1, as in the authors' models.
_base_ = ['mmpretrain::_base_/models/resnet50.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(backbone=dict(type='DBBResNet', zero_init_residual=False))
