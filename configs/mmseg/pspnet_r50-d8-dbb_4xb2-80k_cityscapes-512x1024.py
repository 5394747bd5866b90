# pspnet R50-D8 on Cityscapes with a DBB backbone (offline re-param baseline).
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='DBBResNetV1c'))
