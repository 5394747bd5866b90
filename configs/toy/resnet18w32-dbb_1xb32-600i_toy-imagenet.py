# Toy classifier with a DBB backbone (see the _plain config): the paper's DBB
# baseline, 3x3 convs as Diverse Branch Blocks with BNs inside, 1x1 convs and
# the stem plain.
_base_ = './resnet18w32-plain_1xb32-600i_toy-imagenet.py'
model = dict(backbone=dict(type='DBBResNet'))
