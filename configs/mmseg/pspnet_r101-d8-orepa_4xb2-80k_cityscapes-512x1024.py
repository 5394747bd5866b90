# pspnet R101-D8 (dilated ResNetV1c-101) on Cityscapes 512x1024, 80k
# iterations, with an OREPA backbone: the stock R101 config with the
# backbone type swapped.  open-mmlab://resnet101_v1c loads
# function-preservingly into the origin branches.  Optimizer settings as in
# pspnet_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py.
_base_ = 'mmseg::pspnet/pspnet_r101-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='OREPAResNetV1c'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
