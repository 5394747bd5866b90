# deeplabv3plus R50-D8 on Cityscapes 512x1024, 80k iterations, with the
# paper's protocol: an OREPA ResNet-50 started from an OREPA ImageNet
# classifier; see pspnet_r50-d8-orepa-in1k_4xb2-80k_cityscapes-512x1024.py
# for the checkpoint and why the backbone and the stem's lr change.
_base_ = './deeplabv3plus_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py'

in1k_checkpoint = 'work_dirs/resnet50-orepa_4xb64-coslr-120e_in1k/epoch_120.pth'
model = dict(
    pretrained=None,
    backbone=dict(type='OREPAResNet',
                  init_cfg=dict(type='Pretrained', checkpoint=in1k_checkpoint, prefix='backbone.')))
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'backbone.conv1.branches.stack': dict(lr_mult=0.1),
            # The stem's branch scales match the key above, the longest one, so
            # they need their own keys to keep decay_mult=0.0 as well.
            'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
        }))
