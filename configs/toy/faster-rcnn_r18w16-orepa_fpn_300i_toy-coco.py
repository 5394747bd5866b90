# Toy Faster R-CNN with an OREPA backbone (see the _plain config).
_base_ = './faster-rcnn_r18w16-plain_fpn_300i_toy-coco.py'
model = dict(backbone=dict(type='OREPAResNet'))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'branch_scales': dict(decay_mult=0.0)}))
