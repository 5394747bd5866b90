"""DBB: the Diverse Branch Block (Ding et al., CVPR 2021), offline re-param.

The baseline OREPA is compared against.  Every branch has its own BatchNorm
and runs on the feature map during training, so training costs grow with
the branch count; after training the block fuses into one conv + bias.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import kernels as K
from .base import ConstantBuffers, IntOrPair, ReparamConv2d

__all__ = ['DBBConv2d']


def _fold(kernel: Tensor, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    return K.fold_bn(kernel, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


class DBBConv2d(ConstantBuffers, ReparamConv2d):
    """Drop-in ``nn.Conv2d`` trained as a Diverse Branch Block.

    Branches, each ending in its own BN and summed:

    * ``k x k`` conv;
    * 1x1 conv (``k > 1``);
    * 1x1 conv, then ``k x k`` average pooling (``k > 1``);
    * 1x1 conv (identity-initialised) then ``k x k`` conv.

    Runs with any stride, padding, dilation (the pooling window is dilated
    like the conv's), groups and padding mode; ``fuse()`` gives the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', eps: float = 1e-5, momentum: float = 0.1,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        k = self.kernel_size[0]
        in_g = in_channels // groups
        internal = in_channels if groups <= 4 else 2 * in_channels
        bn = lambda: nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)  # noqa: E731
        self.weight_kxk = nn.Parameter(torch.empty(out_channels, in_g, k, k))
        self.bn_kxk = bn()
        if k > 1:
            self.weight_1x1 = nn.Parameter(torch.empty(out_channels, in_g, 1, 1))
            self.bn_1x1 = bn()
            self.weight_avg = nn.Parameter(torch.empty(out_channels, in_g, 1, 1))
            self.bn_avg = bn()
        self.weight_1x1_kxk_first = nn.Parameter(torch.empty(internal, in_g, 1, 1))
        self.weight_1x1_kxk_second = nn.Parameter(torch.empty(out_channels, internal // groups, k, k))
        self.bn_1x1_kxk = bn()
        self.internal = internal
        self.build_constants()
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def constant_buffers(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        """``avg_window``: the k x k box ``1 / k^2`` as a depthwise kernel;
        ``identity_1x1_kxk``: the identity part of the 1x1-kxk branch's first conv."""
        k = self.kernel_size[0]
        identity = K.grouped_identity(self.internal, self.in_channels // self.groups, dtype, device)
        constants = {'identity_1x1_kxk': identity[:, :, None, None]}
        if k > 1:
            window = K.box_kernel(k, torch.float64).expand(self.out_channels, 1, k, k)
            constants['avg_window'] = window.to(dtype=dtype, device=device).contiguous()
        return constants

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in ('weight_kxk', 'weight_1x1', 'weight_avg', 'weight_1x1_kxk_second'):
                if hasattr(self, name):
                    nn.init.kaiming_uniform_(getattr(self, name), a=0.0)
            self.weight_1x1_kxk_first.zero_()
        for m in self.children():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        self.reset_bias()

    def _centre_offset(self, padding: Tuple[int, int]) -> Tuple[int, int]:
        # A 1x1 kernel at the centre of the k x k window, run with the k x k
        # padding, is a 1x1 conv with padding - dilation * (k // 2).
        r = self.kernel_size[0] // 2
        return padding[0] - self.dilation[0] * r, padding[1] - self.dilation[1] * r

    def _conv_1x1_centred(self, x: Tensor, weight: Tensor, padding: Tuple[int, int]) -> Tensor:
        ph, pw = self._centre_offset(padding)
        if ph < 0 or pw < 0:  # negative padding: crop
            ch, cw = max(-ph, 0), max(-pw, 0)
            x = x[:, :, ch:x.shape[2] - ch, cw:x.shape[3] - cw]
            ph, pw = max(ph, 0), max(pw, 0)
        return F.conv2d(x, weight, None, self.stride, (ph, pw), 1, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        x, padding = self._pad_input(x)
        conv = lambda inp, w: F.conv2d(inp, w, None, self.stride, padding, self.dilation, self.groups)  # noqa: E731
        out = self.bn_kxk(conv(x, self.weight_kxk))
        if self.kernel_size[0] > 1:
            out = out + self.bn_1x1(self._conv_1x1_centred(x, self.weight_1x1, padding))
            y = F.conv2d(x, self.weight_avg, None, 1, 0, 1, self.groups)
            y = F.conv2d(y, self.avg_window, None, self.stride, padding, self.dilation, self.out_channels)
            out = out + self.bn_avg(y)
        y = F.conv2d(x, self.weight_1x1_kxk_first + self.identity_1x1_kxk, None, 1, 0, 1, self.groups)
        out = out + self.bn_1x1_kxk(conv(y, self.weight_1x1_kxk_second))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def fused_kernel_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        k = self.kernel_size[0]
        parts: List[Tuple[Tensor, Tensor]] = [_fold(self.weight_kxk, self.bn_kxk)]
        if k > 1:
            parts.append(_fold(K.pad_to_kxk(self.weight_1x1, k), self.bn_1x1))
            avg = K.as_matrix(self.weight_avg)[:, :, None, None] * self.avg_window[:, :, :, :]
            parts.append(_fold(avg, self.bn_avg))
        composed = K.compose_1x1_kxk(self.weight_1x1_kxk_first + self.identity_1x1_kxk,
                                     self.weight_1x1_kxk_second, self.groups)
        parts.append(_fold(composed, self.bn_1x1_kxk))
        kernel = sum(p[0] for p in parts)
        bias = sum(p[1] for p in parts)
        if self.bias is not None:
            bias = bias + self.bias
        return kernel, bias
