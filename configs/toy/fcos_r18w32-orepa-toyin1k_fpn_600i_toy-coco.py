# Toy FCOS with the paper's protocol: its OREPA backbone starts from the toy
# OREPA classifier trained on the toy ImageNet-format set, every branch
# pretrained (train it first: mim train mmpretrain
# configs/toy/resnet18w32-orepa_1xb32-600i_toy-imagenet.py), with the
# authors' smaller lr on the linear deep stem.
_base_ = './fcos_r18w32-orepa_fpn_600i_toy-coco.py'

in1k_checkpoint = 'work_dirs/resnet18w32-orepa_1xb32-600i_toy-imagenet/iter_600.pth'
# (_delete_: the base config's init_cfg is None, which a dict cannot be merged into)
model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=in1k_checkpoint,
                                         prefix='backbone.')))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'backbone.conv1.branches.stack': dict(lr_mult=0.1),
    # mmengine applies the longest matching key only: the stem's branch scales keep decay_mult=0.0 here.
    'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
    'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
}))
