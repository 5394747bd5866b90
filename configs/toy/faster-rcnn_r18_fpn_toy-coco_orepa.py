# Toy Faster R-CNN with an OREPA backbone (see the _plain config).
_base_ = './faster-rcnn_r18_fpn_toy-coco_plain.py'
model = dict(backbone=dict(type='OREPAResNet'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
