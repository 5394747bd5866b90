# Toy Faster R-CNN with a DBB backbone (see the _plain config): the paper's DBB
# baseline, 3x3 convs as Diverse Branch Blocks, 1x1 convs and the stem plain.
_base_ = './faster-rcnn_r18w16-plain_fpn_300i_toy-coco.py'
model = dict(backbone=dict(type='DBBResNet'))
