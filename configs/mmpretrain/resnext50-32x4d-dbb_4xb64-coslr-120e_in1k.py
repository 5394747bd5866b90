# ResNeXt-50 (32x4d) on ImageNet-1k, dbb, with the OREPA authors' recipe.
# Paper top-1: not in the paper.
#   mim train mmpretrain configs/mmpretrain/resnext50-32x4d-dbb_4xb64-coslr-120e_in1k.py --gpus 4 --launcher pytorch
# conv_cfg=DBB: mmpretrain's ResNeXt builds every conv through it (DBB: the 3x3 ones, grouped,
# become Diverse Branch Blocks).
# zero_init_residual=False: each residual block's last BN starts at 1, as in the authors' models.
_base_ = ['mmpretrain::_base_/models/resnext50_32x4d.py', 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
          'mmpretrain::_base_/default_runtime.py', './_base_/paper-recipe_4xb64-coslr-120e_in1k.py']
model = dict(backbone=dict(conv_cfg=dict(type='DBB'), zero_init_residual=False))
