# faster-rcnn R50-FPN 1x on COCO with the paper's protocol: the OREPA ResNet-50
# starts from an OREPA ImageNet classifier (every branch pretrained), not from
# plain torchvision weights (origin branch only) as in the -orepa config.
# The checkpoint is an mmpretrain ImageClassifier (keys backbone.*): trained
# with configs/mmpretrain/resnet50-orepa_4xb64-coslr-120e_in1k.py, or the
# authors' released ResNet-50 converted with
#   python tools/model_converters/convert_reference_checkpoint.py SRC DST --classifier
# Set in1k_checkpoint (or --cfg-options model.backbone.init_cfg.checkpoint=...).
_base_ = './faster-rcnn_r50-orepa_fpn_1x_coco.py'

in1k_checkpoint = 'work_dirs/resnet50-orepa_4xb64-coslr-120e_in1k/epoch_120.pth'
# The base config's optimizer already gives the linear deep stem the authors'
# smaller lr (lr_mult=0.1 on backbone.conv1.branches.stack; frozen_stages=1
# freezes it unless you unfreeze).
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=in1k_checkpoint, prefix='backbone.')))
