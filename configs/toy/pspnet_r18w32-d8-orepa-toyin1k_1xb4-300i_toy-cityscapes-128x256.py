# Toy PSPNet with the paper's protocol: a dilated OREPA ResNet-18 (width 32,
# 7x7 stem as the linear deep stem, like the classifier) started from the toy
# OREPA classifier trained on the toy ImageNet-format set (train it first:
# mim train mmpretrain configs/toy/resnet18w32-orepa_1xb32-600i_toy-imagenet.py),
# with the authors' smaller lr on the linear deep stem.
_base_ = './pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'

in1k_checkpoint = 'work_dirs/resnet18w32-orepa_1xb32-600i_toy-imagenet/iter_600.pth'
model = dict(backbone=dict(type='OREPAResNet',
                           init_cfg=dict(type='Pretrained', checkpoint=in1k_checkpoint, prefix='backbone.')))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'backbone.conv1.branches.stack': dict(lr_mult=0.1),
    # mmengine applies the longest matching key only: the stem's branch scales keep decay_mult=0.0 here.
    'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
}))
