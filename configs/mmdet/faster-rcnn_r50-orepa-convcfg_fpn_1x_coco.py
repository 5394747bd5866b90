# The two-line backbone swap: the stock Faster R-CNN config with only
# conv_cfg changed; mmdet's own ResNet then builds OREPA layers.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(conv_cfg=dict(type='OREPA')))
