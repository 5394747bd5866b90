# Toy FCOS: a slim ResNet-18 (base width 32) FPN detector trained from scratch
# on the toy COCO-format set (orepa_mm/toy_data: 128x128 images, three shapes),
# about two minutes on 2 CPU cores.  A single-stage, anchor-free detector learns
# far faster from scratch than Faster R-CNN on this budget, and AdamW with a
# cosine schedule faster than SGD.  The OREPA and DBB variants inherit this
# file and change only the backbone type.
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)

data_root = 'data/toy/coco/'
# The toy set draws rectangles, ellipses and triangles under the first three COCO
# category names (see orepa_mm/toy_data).
metainfo = dict(classes=('person', 'bicycle', 'car'), palette=[(220, 20, 60), (119, 11, 32), (0, 0, 142)])
img_scale = (128, 128)
width = 32
max_iters = 600

model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(type='ResNet', depth=18, base_channels=width, style='pytorch', frozen_stages=-1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, init_cfg=None),
    # Objects are 19-64 px: three levels (strides 8, 16, 32) cover them.
    neck=dict(in_channels=[width, width * 2, width * 4, width * 8], out_channels=64, start_level=1,
              add_extra_convs=False, num_outs=3),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2, strides=[8, 16, 32],
                   regress_ranges=((-1, 32), (32, 64), (64, 1e8)),
                   norm_cfg=dict(type='GN', num_groups=16, requires_grad=True)),
    test_cfg=dict(nms_pre=300, max_per_img=50))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, filter_cfg=dict(filter_empty_gt=True, min_size=4),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.003, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters, T_max=max_iters, eta_min=1e-5),
]
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))  # CPU-friendly distributed runs
auto_scale_lr = dict(enable=False)
randomness = dict(seed=0)
