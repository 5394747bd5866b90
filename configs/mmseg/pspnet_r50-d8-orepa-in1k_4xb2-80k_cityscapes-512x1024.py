# pspnet R50-D8 on Cityscapes 512x1024, 80k iterations, with the paper's
# protocol: an OREPA ResNet-50 (7x7 stem as the linear deep stem, like the
# ImageNet model) started from an OREPA ImageNet classifier, every branch
# pretrained, instead of the -orepa config's OREPAResNetV1c from plain
# open-mmlab://resnet50_v1c weights.  The checkpoint is an mmpretrain
# ImageClassifier (keys backbone.*): trained with
# configs/mmpretrain/resnet50-orepa_4xb64-coslr-120e_in1k.py, or the authors'
# released ResNet-50 converted with
#   python tools/model_converters/convert_reference_checkpoint.py SRC DST --classifier
# Set in1k_checkpoint (or --cfg-options model.backbone.init_cfg.checkpoint=...).
_base_ = './pspnet_r50-d8-orepa_4xb2-80k_cityscapes-512x1024.py'

in1k_checkpoint = 'work_dirs/resnet50-orepa_4xb64-coslr-120e_in1k/epoch_120.pth'
model = dict(
    pretrained=None,
    backbone=dict(type='OREPAResNet',
                  init_cfg=dict(type='Pretrained', checkpoint=in1k_checkpoint, prefix='backbone.')))
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            # The authors' advice for fine-tuning from their ImageNet weights:
            # a smaller lr on the linear deep stem (a product of three kernels).
            'backbone.conv1.branches.stack': dict(lr_mult=0.1),
            # The stem's branch scales match the key above, the longest one, so
            # they need their own keys to keep decay_mult=0.0 as well.
            'backbone.conv1.branches.stack.0.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.1.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
            'backbone.conv1.branches.stack.2.branch_scales': dict(lr_mult=0.1, decay_mult=0.0),
        }))
