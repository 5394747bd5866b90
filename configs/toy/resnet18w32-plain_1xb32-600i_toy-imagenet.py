# Toy classifier: a slim ResNet-18 (base width 32) trained from scratch on the
# toy ImageNet-format set (orepa_mm/toy_data), 6 classes of 64x64 images, in
# a few minutes on 2 CPU cores, with the paper's ImageNet recipe scaled down:
# SGD (momentum 0.9, weight decay 1e-4, none on BN) with a linear warm-up and
# cosine decay, batch 32.  The OREPA and DBB variants inherit this file and
# change only the backbone type.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)

data_root = 'data/toy/imagenet'
classes = ('rectangle_solid', 'rectangle_striped', 'ellipse_solid', 'ellipse_striped', 'triangle_solid',
           'triangle_striped')
width = 32
max_iters = 600

data_preprocessor = dict(num_classes=len(classes))
model = dict(
    backbone=dict(type='ResNet', depth=18, stem_channels=width, base_channels=width),
    head=dict(num_classes=len(classes), in_channels=width * 8, topk=(1, )))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.6, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False, sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', T_max=max_iters - 30, eta_min=0.0, by_epoch=False, begin=30, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=32)
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
log_processor = dict(by_epoch=False)
