# deeplabv3plus R50-D8 (dilated ResNetV1c) on Cityscapes 512x1024, 80k iterations,
# with an OREPA backbone.  mim train mmseg <this config> --gpus 4 --launcher pytorch
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)

# Dilations (1, 1, 2, 4) use padding = dilation, which OREPA layers take
# (the reference code could not).  open-mmlab://resnet50_v1c loads
# function-preservingly into the origin branches.
model = dict(backbone=dict(type='OREPAResNetV1c'))

optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            # See configs/mmdet/faster-rcnn_r50-orepa_fpn_1x_coco.py: the
            # branch scales only mix branches, so no weight decay on them.
            'branch_scales': dict(decay_mult=0.0),
        }))
