"""DBB: the Diverse Branch Block (Ding et al., CVPR 2021), offline re-param.

The baseline OREPA is compared against, with the published branch structure
(``docs/method.md``): BatchNorms inside the branches, not only at their ends,
so every branch runs on the feature map during training and the block is not
linear there; after training it fuses exactly into one conv + bias.

``conv_cfg=dict(type='DBB')`` (:func:`dbb_conv`) is the paper's baseline: it
converts only the k x k convs (the 3x3 convs of a ResNet) and leaves 1x1
convs and the large stem plain; ``dict(type='DBB', every_conv=True)`` or the
class itself (``type='DBBConv2d'``) converts every conv it is given.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from .. import kernels as K
from .base import ConstantBuffers, IntOrPair, ReparamConv2d
from .orepa import branch_kind

__all__ = ['DBBConv2d', 'dbb_conv', 'build_branch_norm']

#: The norm types a DBB block can hold without mmcv's registry.
_TORCH_NORMS = {'BN': nn.BatchNorm2d, 'BN2d': nn.BatchNorm2d, 'SyncBN': nn.SyncBatchNorm}


def _norm_class(norm_type: Any) -> Any:
    """The class of a ``norm_cfg`` type: a class, or a name in the OpenMMLab
    registries (mmcv registers 'BN', 'SyncBN', 'GN'...), else the torch default."""
    if not isinstance(norm_type, str):
        return norm_type
    try:
        from mmengine.registry import MODELS
        found = MODELS.get(norm_type)
    except (ImportError, KeyError):
        found = None
    if found is None:
        found = _TORCH_NORMS.get(norm_type.split('.')[-1])
    if found is None:
        raise ValueError(f'DBBConv2d: unknown norm_cfg type {norm_type!r}')
    return found


def build_branch_norm(norm_cfg: Optional[dict], num_features: int, eps: float = 1e-5,
                      momentum: float = 0.1) -> _BatchNorm:
    """A BN inside a DBB branch, of the ``norm_cfg`` type (default ``BN``).

    mmcv's ``norm_cfg`` conventions hold (``requires_grad``, optional ``eps``
    / ``momentum``).  Only BatchNorm variants are accepted: fusing folds each
    BN into the kernel with its running statistics, which other norms (GN,
    LN, IN) do not have.
    """
    cfg = dict(norm_cfg) if norm_cfg else dict(type='BN')
    norm_type = cfg.pop('type', 'BN')
    requires_grad = cfg.pop('requires_grad', True)
    cls = _norm_class(norm_type)
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise ValueError(f'DBBConv2d: norm_cfg type {norm_type!r} ({getattr(cls, "__name__", cls)}) cannot be '
                         'folded into a conv: the BNs inside a DBB block fuse with their running statistics, '
                         "so they must be a BatchNorm variant (e.g. 'BN', 'SyncBN')")
    cfg.setdefault('eps', eps)
    cfg.setdefault('momentum', momentum)
    norm = cls(num_features, **cfg)
    norm.requires_grad_(requires_grad)
    return norm


def _fold(kernel: Tensor, bn: _BatchNorm, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return K.fold_bn(kernel, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def _bn_and_pad(bn: _BatchNorm, y: Tensor, padding: Tuple[int, int]) -> Tensor:
    """BN, then pad by ``padding`` with the BN's output for a zero input
    (from its running statistics) instead of zeros.  In eval mode the padded
    map is then exactly ``BN(pad(y))`` of the BN folded into the conv before
    it, which is what makes the branch fuse exactly."""
    y = bn(y)
    ph, pw = padding
    if ph == 0 and pw == 0:
        return y
    with torch.no_grad():  # as published: a constant of the running statistics, also in training
        zero_output = _fold(bn.running_mean.new_zeros(bn.num_features, 1), bn)[1]
    out = F.pad(y, (pw, pw, ph, ph))
    value = zero_output.to(out.dtype).view(1, -1, 1, 1)
    if ph:
        out[:, :, :ph, :] = value
        out[:, :, -ph:, :] = value
    if pw:
        out[:, :, :, :pw] = value
        out[:, :, :, -pw:] = value
    return out


class DBBConv2d(ConstantBuffers, ReparamConv2d):
    """Drop-in ``nn.Conv2d`` trained as a Diverse Branch Block, as published.

    Branches, summed (``p`` the padding, ``s`` the stride, ``g`` the groups):

    ==========  ==================================================================
    origin      k x k conv -> BN
    1x1         1x1 conv (stride s) -> BN                           (``g < out``)
    avg         1x1 conv -> BN-and-pad(p) -> k x k average pool (stride s) -> BN
                (``g < out``); for ``g >= out``: average pool (padding p) -> BN
    1x1-kxk     identity-based 1x1 conv -> BN-and-pad(p) -> k x k conv (stride s)
                -> BN; for ``g >= out`` a plain 1x1 conv of width ``2 * in``
    ==========  ==================================================================

    "BN-and-pad" pads with the BN's output for a zero input, so the k x k
    stage sees ``BN(x)`` padded exactly as the folded branch would be; the
    branch then fuses into one kernel + bias with no approximation.  The
    "identity-based" 1x1 conv is a zero-initialised weight plus a constant
    identity (when its width is ``in``).  The average pool is a depthwise
    conv with the ``1 / k^2`` box, dilated like the conv, which equals
    ``nn.AvgPool2d`` (``count_include_pad=True``) for dilation 1; for
    ``g >= out`` it pools one input channel of each output's group (input
    ``o`` for output ``o`` in the published depthwise case, ``in == out``).  For ``k = 1`` the 1x1 branch
    would repeat the origin and a 1x1 pool is the identity, so the block is
    origin and 1x1-kxk.  Any stride, padding (the 1x1 branch is centred in
    the k x k window), dilation, groups and padding mode of ``nn.Conv2d``
    is supported.

    A plain conv checkpoint (``weight``, optional ``bias``) loads function-
    preservingly: the origin kernel is the weight, its BN a pass-through in
    eval mode (mean 0, variance 1, scale ``sqrt(1 + eps)``, shift 0) and the
    last BN of every other branch has scale and shift 0, so those branches
    contribute zero (their weights keep their values and start learning as
    the scales move off zero).  ``init_cfg=dict(type='Pretrained')`` with an
    ImageNet ResNet thus starts as that ResNet.

    Args beyond ``nn.Conv2d``'s:
        norm_cfg: the BNs' type, mmcv style (default ``dict(type='BN')``);
            BatchNorm variants only (``SyncBN`` in distributed training).
        eps, momentum: of those BNs, unless ``norm_cfg`` sets them.
        single_init: start as the origin conv + BN (the last BN of every
            other branch at scale 0).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', norm_cfg: Optional[dict] = None, eps: float = 1e-5,
                 momentum: float = 0.1, single_init: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        k = self.kernel_size[0]
        in_g = in_channels // groups
        self.norm_cfg = norm_cfg
        self.single_init = single_init
        # The published variants: with a group per output channel (depthwise)
        # a 1x1 branch is a per-channel scale and the avg branch pools the
        # input directly; the 1x1-kxk branch then widens to 2 * in.
        self.has_1x1 = k > 1 and groups < out_channels
        self.has_avg = k > 1
        self.internal = in_channels if groups < out_channels else 2 * in_channels
        norm: Callable[[int], _BatchNorm] = lambda n: build_branch_norm(norm_cfg, n, eps, momentum)  # noqa: E731

        self.weight_origin = nn.Parameter(torch.empty(out_channels, in_g, k, k))
        self.bn_origin = norm(out_channels)
        if self.has_1x1:
            self.weight_1x1 = nn.Parameter(torch.empty(out_channels, in_g, 1, 1))
            self.bn_1x1 = norm(out_channels)
        if self.has_avg:
            if self.has_1x1:
                self.weight_avg = nn.Parameter(torch.empty(out_channels, in_g, 1, 1))
                self.bn_avg_pad = norm(out_channels)
            self.bn_avg = norm(out_channels)
        self.weight_1x1_kxk_first = nn.Parameter(torch.empty(self.internal, in_g, 1, 1))
        self.bn_1x1_kxk_pad = norm(self.internal)
        self.weight_1x1_kxk_second = nn.Parameter(torch.empty(out_channels, self.internal // groups, k, k))
        self.bn_1x1_kxk = norm(out_channels)
        self.build_constants()
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def identity_based(self) -> bool:
        """Whether the 1x1-kxk branch's first conv is identity + a zero-initialised weight."""
        return self.internal == self.in_channels

    def constant_buffers(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        """``avg_window`` (``groups < out``): the k x k box ``1 / k^2`` per output
        channel (``(out, 1, k, k)``, depthwise); ``avg_kernel`` (``groups >= out``):
        the pool of input channel ``o % (in / groups)`` of group ``o`` as a
        grouped kernel; ``identity_1x1_kxk``: the identity part of the
        identity-based 1x1 conv."""
        k, o, in_g = self.kernel_size[0], self.out_channels, self.in_channels // self.groups
        constants = {}
        box = K.box_kernel(k, torch.float64)
        if self.has_avg and self.has_1x1:
            constants['avg_window'] = box.expand(o, 1, k, k).to(dtype=dtype, device=device).contiguous()
        elif self.has_avg:
            select = K.grouped_identity(o, in_g, torch.float64)
            constants['avg_kernel'] = (select[:, :, None, None] * box).to(dtype=dtype, device=device)
        if self.identity_based:
            identity = K.grouped_identity(self.internal, in_g, dtype, device)
            constants['identity_1x1_kxk'] = identity[:, :, None, None]
        return constants

    def reset_parameters(self) -> None:
        """The published initialisation: ``nn.Conv2d``'s default for every
        kernel, zeros for the identity-based conv, BNs at scale 1 / shift 0
        (with ``single_init``, the last BN of every branch but the origin at 0)."""
        with torch.no_grad():
            for name in ('weight_origin', 'weight_1x1', 'weight_avg', 'weight_1x1_kxk_second'):
                if hasattr(self, name):
                    nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
            if self.identity_based:
                self.weight_1x1_kxk_first.zero_()
            else:
                nn.init.kaiming_uniform_(self.weight_1x1_kxk_first, a=math.sqrt(5))
            for bn in self.norms():
                bn.reset_parameters()
            if self.single_init:
                for bn in self.branch_output_norms()[1:]:
                    bn.weight.zero_()
        self.reset_bias()

    def norms(self) -> List[_BatchNorm]:
        """Every BN of the block, inner ones included."""
        return [m for m in self.children() if isinstance(m, _BatchNorm)]

    def branch_output_norms(self) -> List[_BatchNorm]:
        """The last BN of each branch, the origin's first."""
        names = ('bn_origin', 'bn_1x1', 'bn_avg', 'bn_1x1_kxk')
        return [getattr(self, n) for n in names if hasattr(self, n)]

    # -- forward -------------------------------------------------------------------
    def _centred_1x1_padding(self, padding: Tuple[int, int]) -> Tuple[int, int]:
        # A 1x1 kernel at the centre of the k x k window, run with the k x k
        # padding, is a 1x1 conv with padding - dilation * (k // 2).
        r = self.kernel_size[0] // 2
        return padding[0] - self.dilation[0] * r, padding[1] - self.dilation[1] * r

    def _conv_1x1_centred(self, x: Tensor, weight: Tensor, padding: Tuple[int, int]) -> Tensor:
        ph, pw = self._centred_1x1_padding(padding)
        if ph < 0 or pw < 0:  # negative padding: crop
            ch, cw = max(-ph, 0), max(-pw, 0)
            x = x[:, :, ch:x.shape[2] - ch, cw:x.shape[3] - cw]
            ph, pw = max(ph, 0), max(pw, 0)
        return F.conv2d(x, weight, None, self.stride, (ph, pw), 1, self.groups)

    def _first_1x1_kxk(self) -> Tensor:
        w = self.weight_1x1_kxk_first
        return w + self.identity_1x1_kxk if self.identity_based else w

    def forward(self, x: Tensor) -> Tensor:
        if self._weight_handout is not None:
            self.apply_weight_writes()
        x, padding = self._pad_input(x)
        s, d, g = self.stride, self.dilation, self.groups
        out = self.bn_origin(F.conv2d(x, self.weight_origin, None, s, padding, d, g))
        if self.has_1x1:
            out = out + self.bn_1x1(self._conv_1x1_centred(x, self.weight_1x1, padding))
        if self.has_avg:
            if self.has_1x1:
                y = _bn_and_pad(self.bn_avg_pad, F.conv2d(x, self.weight_avg, None, 1, 0, 1, g), padding)
                y = F.conv2d(y, self.avg_window, None, s, 0, d, self.out_channels)
            else:
                y = F.conv2d(x, self.avg_kernel, None, s, padding, d, g)
            out = out + self.bn_avg(y)
        y = _bn_and_pad(self.bn_1x1_kxk_pad, F.conv2d(x, self._first_1x1_kxk(), None, 1, 0, 1, g), padding)
        out = out + self.bn_1x1_kxk(F.conv2d(y, self.weight_1x1_kxk_second, None, s, 0, d, g))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    # -- fusing --------------------------------------------------------------------
    def fused_kernel_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        self.apply_weight_writes()
        return self._fused_kernel_bias()

    @torch.no_grad()
    def _fused_kernel_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        k, g = self.kernel_size[0], self.groups
        parts: List[Tuple[Tensor, Tensor]] = [_fold(self.weight_origin, self.bn_origin)]
        if self.has_1x1:
            parts.append(_fold(K.pad_to_kxk(self.weight_1x1, k), self.bn_1x1))
        if self.has_avg:
            if self.has_1x1:
                # 1x1 with the inner BN folded (a bias per channel), then the
                # box, through which that bias passes as itself (the box sums to 1)
                first, first_bias = _fold(self.weight_avg, self.bn_avg_pad)
                kernel = K.as_matrix(first)[:, :, None, None] * self.avg_window
                bias = K.conv_of_constant(self.avg_window, first_bias, self.out_channels)
                parts.append(_fold(kernel, self.bn_avg, bias))
            else:
                parts.append(_fold(self.avg_kernel, self.bn_avg))
        first, first_bias = _fold(self._first_1x1_kxk(), self.bn_1x1_kxk_pad)
        second = self.weight_1x1_kxk_second
        kernel = K.compose_1x1_kxk(first, second, g)
        parts.append(_fold(kernel, self.bn_1x1_kxk, K.conv_of_constant(second, first_bias, g)))
        kernel = sum(p[0] for p in parts)
        bias = sum(p[1] for p in parts)
        if self.bias is not None:
            bias = bias + self.bias
        return kernel, bias

    # -- loading plain checkpoints ---------------------------------------------------
    def current_kernel(self) -> Tensor:
        """The fused kernel (eval mode: the BNs' running statistics)."""
        return self._fused_kernel_bias()[0]

    @torch.no_grad()
    def load_plain_kernel(self, kernel: Tensor) -> None:
        """As a plain checkpoint loads (:meth:`plain_state`): exact in eval mode."""
        self.load_state_dict(self.plain_state(kernel), strict=False)  # every entry but the bias

    @torch.no_grad()
    def plain_state(self, weight: Tensor) -> Dict[str, Tensor]:
        """Values (by state-dict name) that make the block compute the plain
        conv kernel ``weight`` in eval mode: see the class docstring."""
        state = {name: t.detach().clone() for name, t in self.state_dict().items() if name != 'bias'}
        state['weight_origin'] = weight.detach().clone()
        bn = self.bn_origin
        state.update({'bn_origin.running_mean': torch.zeros_like(bn.running_mean),
                      'bn_origin.running_var': torch.ones_like(bn.running_var),
                      'bn_origin.weight': torch.full_like(bn.weight, math.sqrt(1 + bn.eps)),
                      'bn_origin.bias': torch.zeros_like(bn.bias)})
        for name in ('bn_1x1', 'bn_avg', 'bn_1x1_kxk'):
            if hasattr(self, name):
                state[f'{name}.weight'] = torch.zeros_like(getattr(self, name).weight)
                state[f'{name}.bias'] = torch.zeros_like(getattr(self, name).bias)
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        plain_key = prefix + 'weight'
        own = [prefix + name for name in self.state_dict() if name != 'bias']
        if plain_key in state_dict and not any(key in state_dict for key in own):
            weight = state_dict.pop(plain_key)
            expected = tuple(self.weight_origin.shape)
            if tuple(weight.shape) != expected:
                error_msgs.append(f'size mismatch for {plain_key}: copying a plain conv weight of shape '
                                  f'{tuple(weight.shape)} into a DBBConv2d expecting {expected}')
            else:
                for name, t in self.plain_state(weight).items():
                    state_dict[prefix + name] = t
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def dbb_conv(in_channels: int, out_channels: int, kernel_size: IntOrPair, *args: Any, every_conv: bool = False,
             norm_cfg: Optional[dict] = None, **kwargs: Any) -> nn.Module:
    """The ``conv_cfg=dict(type='DBB')`` layer: the paper's DBB baseline.

    A :class:`DBBConv2d` for a k x k conv (odd ``3 <= k < 7``, the kernel
    sizes :func:`orepa_mm.layers.orepa.branch_kind` calls ``'kxk'``: the 3x3
    convs of a ResNet), a plain ``nn.Conv2d`` for any other (1x1 convs, the
    7x7 stem, even or non-square kernels), as in the published DBB ResNet.
    ``every_conv=True`` makes every conv a :class:`DBBConv2d`.  ``norm_cfg``
    is the BN type inside the DBB layers (a DBB ResNet passes its own).
    """
    kh, kw = _pair(kernel_size)
    kxk = kh == kw and kh > 1 and kh % 2 == 1 and branch_kind(kh) == 'kxk'
    if every_conv or kxk:
        return DBBConv2d(in_channels, out_channels, kernel_size, *args, norm_cfg=norm_cfg, **kwargs)
    for key in ('eps', 'momentum', 'single_init'):  # DBB-only arguments
        kwargs.pop(key, None)
    return nn.Conv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
