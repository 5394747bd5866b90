# faster-rcnn R50-FPN 1x on COCO with a DBB ResNet-50 (offline re-param baseline).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)
model = dict(backbone=dict(type='DBBResNet'))
