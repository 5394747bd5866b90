# Toy Faster R-CNN with a DBB backbone (see the _plain config).
_base_ = './faster-rcnn_r18_fpn_toy-coco_plain.py'
model = dict(backbone=dict(type='DBBResNet'))
