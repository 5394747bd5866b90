# pspnet R50-D8 on Cityscapes, plain ResNetV1c: the stock mmseg config plus
# orepa_mm's import (weights-only checkpoint loading under torch>=2.6).
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
