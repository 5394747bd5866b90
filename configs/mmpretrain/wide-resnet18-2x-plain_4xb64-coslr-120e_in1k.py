# WRN-18 (2x) on ImageNet-1k, plain, with the OREPA authors' recipe: ResNet-18 at twice the
# width (stem 128, stages 128 to 1024).
# Paper top-1: 74.74.
#   mim train mmpretrain configs/mmpretrain/wide-resnet18-2x-plain_4xb64-coslr-120e_in1k.py --gpus 4 --launcher pytorch
# zero_init_residual=False: each residual block's last BN starts at 1, as in the authors' models.
_base_ = ['mmpretrain::_base_/models/resnet18.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(
    backbone=dict(stem_channels=128, base_channels=128, zero_init_residual=False),
    head=dict(in_channels=1024))
