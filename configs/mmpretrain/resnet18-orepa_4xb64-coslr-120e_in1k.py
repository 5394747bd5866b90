# ResNet-18 on ImageNet-1k, orepa, with the OREPA authors' recipe.
# Paper top-1: 72.13.
#   mim train mmpretrain configs/mmpretrain/resnet18-orepa_4xb64-coslr-120e_in1k.py --gpus 4 --launcher pytorch
# OREPAResNet: every conv an OREPA layer, the 7x7 stem the linear deep stem.
# zero_init_residual=False: each residual block's last BN starts at 1, as in the authors' models.
_base_ = ['mmpretrain::_base_/models/resnet18.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(backbone=dict(type='OREPAResNet', zero_init_residual=False))
