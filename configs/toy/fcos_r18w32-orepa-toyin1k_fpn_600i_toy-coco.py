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
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone.conv1.branches.stack': dict(lr_mult=0.1)}))
