# retinanet R50-FPN 1x on COCO, plain ResNet-50: the stock mmdet config, plus
# orepa_mm's import so checkpoints load under torch>=2.6 weights-only loading.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
