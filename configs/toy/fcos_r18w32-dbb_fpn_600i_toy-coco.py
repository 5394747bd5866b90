# Toy FCOS with a DBB backbone (see the _plain config): the paper's DBB
# baseline, 3x3 convs as Diverse Branch Blocks, 1x1 convs and the stem plain.
_base_ = './fcos_r18w32-plain_fpn_600i_toy-coco.py'
model = dict(backbone=dict(type='DBBResNet'))
