# ResNet-34 on ImageNet-1k, plain, with the OREPA authors' recipe.
# Paper top-1: 74.13.
#   mim train mmpretrain configs/mmpretrain/resnet34-plain_4xb64-coslr-120e_in1k.py --gpus 4 --launcher pytorch
# zero_init_residual=False: each residual block's last BN starts at 1, as in the authors' models.
_base_ = ['mmpretrain::_base_/models/resnet34.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(backbone=dict(zero_init_residual=False))
