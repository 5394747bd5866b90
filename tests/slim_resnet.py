"""A slim ResNet for the library tests that must run without mmdet/mmseg.

Built like mmdet's ``ResNet`` (the same module names, ``conv1`` ...
``layerN[i].convJ``/``downsample``; ``frozen_stages``; ``with_cp`` through
``torch.utils.checkpoint``; every conv through mmcv's ``build_conv_layer``,
so ``conv_cfg=dict(type='OREPA')`` makes them OREPA layers) but only from
mmcv's bricks, which mmcv-lite has: the compatibility job runs these tests on
the oldest supported torch without mmcv's compiled ops.  Framework backbones
themselves are tested in ``test_backbones.py`` and ``test_backbone_sweep.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_conv_layer
from torch import Tensor


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, conv_cfg: Optional[dict], with_cp: bool) -> None:
        super().__init__()
        width = planes
        self.conv1 = build_conv_layer(conv_cfg, inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = build_conv_layer(conv_cfg, width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = build_conv_layer(conv_cfg, width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                build_conv_layer(conv_cfg, inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion))
        self.with_cp = with_cp

    def _inner(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))

    def forward(self, x: Tensor) -> Tensor:
        out = cp.checkpoint(self._inner, x) if self.with_cp and x.requires_grad else self._inner(x)
        return self.relu(out)


class BasicBlock(Bottleneck):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, conv_cfg: Optional[dict], with_cp: bool) -> None:
        nn.Module.__init__(self)
        self.conv1 = build_conv_layer(conv_cfg, inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = build_conv_layer(conv_cfg, planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(build_conv_layer(conv_cfg, inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.with_cp = with_cp

    def _inner(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class SlimResNet(nn.Module):
    """ResNet-18/34/50 of width ``base_channels``; returns the four stages' outputs."""

    def __init__(self, depth: int = 18, base_channels: int = 8, conv_cfg: Optional[dict] = None,
                 frozen_stages: int = -1, with_cp: bool = False) -> None:
        super().__init__()
        block, counts = ARCH[depth]
        self.conv1 = build_conv_layer(conv_cfg, 3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base_channels
        for i, count in enumerate(counts):
            planes = base_channels * 2 ** i
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, 2 if i and not j else 1, conv_cfg, with_cp))
                inplanes = planes * block.expansion
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> 'SlimResNet':
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
            outs.append(x)
        return tuple(outs)
