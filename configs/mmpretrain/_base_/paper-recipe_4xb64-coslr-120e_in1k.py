# The OREPA authors' ImageNet recipe (their train.py) as an mmpretrain
# schedule, used by every model of the paper's ImageNet tables together with
# mmpretrain's own model, dataset (batch 64, Pillow resizing as torchvision
# does) and runtime bases:
# - 120 epochs, batch 256 as 4 GPUs x 64;
# - SGD, lr 0.1, momentum 0.9 (no Nesterov), weight decay 1e-4 except on BN
#   parameters and biases, twice the lr on conv/linear biases (mmengine's
#   bias_lr_mult leaves BN biases at 1x, the authors' code doubles those too);
#   the branch scales are decayed like any weight, as the authors do;
# - cosine decay to 0 per iteration, no warm-up (theirs lasts 5 iterations);
# - RandomResizedCrop(224) + horizontal flip; Resize(256) + CenterCrop(224);
#   plain cross-entropy, no label smoothing.
# For another total batch, scale the lr linearly: --auto-scale-lr.
custom_imports = dict(imports=['orepa_mm'], allow_failed_imports=False)

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, bias_lr_mult=2.0))
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=120, eta_min=0.0, by_epoch=True, begin=0, end=120,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)
