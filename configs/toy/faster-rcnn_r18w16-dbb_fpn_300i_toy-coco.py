# Toy Faster R-CNN with a DBB backbone (see the _plain config).
_base_ = './faster-rcnn_r18w16-plain_fpn_300i_toy-coco.py'
model = dict(backbone=dict(type='DBBResNet'))
