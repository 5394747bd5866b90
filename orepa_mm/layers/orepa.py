"""OREPA: online convolutional re-parameterization (Hu et al., CVPR 2022).

``OREPAConv2d`` trains a linear multi-branch block but runs ONE conv per
forward: its kernel is generated from the branch parameters (work independent
of the feature map), then convolved with the input.  (In training, a two-conv
branch may instead run on the feature map where that is cheaper:
:mod:`.feature_path`.)  The block carries no BN:
in an mmdet/mmseg ResNet the model's own BN after the conv is OREPA's "one BN
after the sum", so a fused model is a vanilla model.

Kernel generators (:class:`KernelGenerator`, :mod:`.kernel_generator`:
``nn.Module`` s whose ``forward()`` takes no input and returns a kernel) hold
the branch parameters (:mod:`.orepa_branches`); :func:`branch_kind` is THE
rule that picks one from the kernel size:

* :class:`OREPA1x1Branches` for ``k = 1``;
* :class:`OREPAKxKBranches`, the six-branch block, for odd ``3 <= k < large``;
* :class:`OREPAStackedBranches`, the "linear deep stem", for odd ``k >= large``
  (``LARGE_KERNEL_THRESHOLD = 7`` by default, i.e. the ResNet stem).
"""
from __future__ import annotations

from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import compat
from .base import IntOrPair, ReparamConv2d
from .batched_generation import training_conv
from .feature_path import FEATURE_PATHS, FeaturePlan
from .kernel_cache import KernelCache
from .kernel_generator import ALL_BRANCHES, SCALINGS, KernelGenerator
from .orepa_branches import OREPA1x1Branches, OREPAKxKBranches, OREPAStackedBranches

__all__ = ['OREPAConv2d', 'KernelGenerator', 'OREPA1x1Branches', 'OREPAKxKBranches', 'OREPAStackedBranches',
           'LARGE_KERNEL_THRESHOLD', 'BranchKind', 'branch_kind', 'build_branches', 'ALL_BRANCHES', 'SCALINGS']

#: Smallest kernel size built as stacked 3x3 blocks by default (the 7x7 ResNet stem).
LARGE_KERNEL_THRESHOLD = 7

BranchKind = Literal['1x1', 'kxk', 'stacked']


def branch_kind(kernel_size: int, large_kernel_threshold: int = LARGE_KERNEL_THRESHOLD) -> BranchKind:
    """The block kind of a ``kernel_size`` x ``kernel_size`` conv: ``'1x1'``
    for 1, ``'kxk'`` (six branches) for odd sizes below
    ``large_kernel_threshold``, ``'stacked'`` (the linear deep stem) from it on.

    The one place that maps kernel sizes to blocks: :class:`OREPAConv2d`,
    DBB's "k x k convs only" rule and the reference-checkpoint converter use it.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or (kernel_size > 1 and kernel_size % 2 == 0):
        raise ValueError(f'kernel_size must be 1 or an odd int (the branches are centred), got {kernel_size!r}')
    if kernel_size == 1:
        return '1x1'
    return 'kxk' if kernel_size < large_kernel_threshold else 'stacked'


def build_branches(in_channels: int, out_channels: int, kernel_size: int, groups: int = 1,
                   large_kernel_threshold: int = LARGE_KERNEL_THRESHOLD, branches: Optional[Sequence[str]] = None,
                   scaling: str = 'channel') -> KernelGenerator:
    """The freshly initialised generator of the block :func:`branch_kind`
    picks, with the named ``branches`` it has (all when None) and ``scaling``."""
    kind = branch_kind(kernel_size, large_kernel_threshold)
    if kind == '1x1':
        return OREPA1x1Branches(in_channels, out_channels, groups, branches, scaling)
    if kind == 'kxk':
        return OREPAKxKBranches(in_channels, out_channels, kernel_size, groups, branches, scaling)
    return OREPAStackedBranches(in_channels, out_channels, kernel_size, groups, branches, scaling)


class OREPAConv2d(ReparamConv2d):
    """Drop-in ``nn.Conv2d`` trained as an OREPA block, one conv per forward.

    The block kind follows the kernel size (:func:`branch_kind`): ``k = 1``
    the 1x1 block, odd ``3 <= k < large_kernel_threshold`` the six-branch
    block, odd ``k >= large_kernel_threshold`` stacked 3x3 blocks (the
    "linear deep stem").  Any stride, padding, dilation, groups (depthwise
    included) and ``padding_mode`` of ``nn.Conv2d`` are honoured, since a
    single conv runs.

    A plain conv checkpoint (``weight``, optional ``bias``) loads into the
    layer so that it computes exactly that conv (origin = weight, origin
    scale 1, other scales 0), which makes ``init_cfg=dict(type='Pretrained')``
    with an ImageNet ResNet start as that ResNet.

    In training the kernel comes from one generation shared by every OREPA
    layer of the same shape (:mod:`orepa_mm.layers.batched_generation`);
    the parameters stay this layer's own.  In eval/no-grad use the generated
    kernel is cached and reused only while every branch parameter holds the
    values it held when the kernel was generated, however it was written
    (:class:`~orepa_mm.layers.kernel_cache.KernelCache` says what is
    compared and why that is safe), so unfused evaluation costs one plain
    conv and an EMA copy or momentum encoder never runs a stale kernel.
    ``fuse()`` returns the equivalent ``nn.Conv2d``.

    Args beyond ``nn.Conv2d``'s:
        large_kernel_threshold: smallest kernel built as stacked 3x3 blocks.
        single_init: start as one plain conv (origin scale 1, others 0).
        branches: the branches to keep, by name (:data:`ALL_BRANCHES`;
            ``'origin'`` is required; each block keeps those it has); None,
            the default, keeps all: the paper's block.  For the paper's
            component ablation, e.g. ``('origin', 'avg', '1x1_kxk', '1x1')``
            is the block without the frequency prior, the depthwise-separable
            branch, the re-parameterized 1x1 (``'l2i'``) and the linear deep
            stem (``'deep_stem'``).
        scaling: ``'channel'`` (default, the paper's), ``'scalar'`` (one
            scale per branch) or ``'none'`` (branches summed unscaled).
        feature_path: ``'auto'`` (default): in a training step, the
            ``1x1_kxk`` / ``l2i`` branch runs as two convs on the feature
            map when that costs fewer multiply-adds than folding it into
            the kernel (small batches, wide layers) and the map it keeps is
            no larger than the kernel; ``'never'``: always in the kernel
            (one conv per forward, the paper's form); ``'always'``: always
            on the feature map.  The same function either way; evaluation
            and fusing always use the whole kernel
            (:mod:`orepa_mm.layers.feature_path`, whose
            ``feature_path_report(model)`` lists the choices).

    Every option is still one conv per forward (with ``feature_path``'s
    exception in training), fuses exactly, and batches with the layers of
    the same shape and options.  In an mmdet/mmseg
    config: ``conv_cfg=dict(type='OREPA', scaling='scalar')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', large_kernel_threshold: int = LARGE_KERNEL_THRESHOLD,
                 single_init: bool = False, branches: Optional[Sequence[str]] = None,
                 scaling: str = 'channel', feature_path: str = 'auto', device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        if feature_path not in FEATURE_PATHS:
            raise ValueError(f'OREPAConv2d: feature_path must be one of {FEATURE_PATHS}, got {feature_path!r}')
        #: When a training step computes a two-conv branch on the feature map (see the class docstring).
        self.feature_path = feature_path
        #: The last training step's choice (:class:`~orepa_mm.layers.feature_path.FeaturePlan`), or None.
        self.feature_plan: Optional[FeaturePlan] = None
        self.branches = build_branches(in_channels, out_channels, self.kernel_size[0], groups,
                                       large_kernel_threshold, branches, scaling)
        self.single_init = single_init
        self._cache: Optional[KernelCache] = None
        if single_init:
            self.branches.reset_parameters(single_init=True)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Re-draw the designed initialisation."""
        self.branches.reset_parameters(single_init=self.single_init)
        self.reset_bias()

    # -- the generated kernel ---------------------------------------------------
    def current_kernel(self) -> Tensor:
        """The generated kernel (with its graph when gradients are enabled)."""
        return self.branches()

    def load_plain_kernel(self, kernel: Tensor) -> None:
        values = {name: t.detach() for name, t in self.branches.state_dict().items()}
        values.update(self.branches.plain_state(kernel))
        self.branches.load_state_dict(values)

    def _cached_kernel(self, params: List[Tensor]) -> Tensor:
        """The generated kernel, reused while every branch parameter (``params``)
        is what it was when the kernel was generated (:class:`KernelCache`)."""
        if self._cache is not None and self._cache.holds(params):
            return self._cache.kernel
        # Not an inference tensor, even when filled under inference_mode,
        # so that a later grad-mode forward of a frozen layer can use it.
        with torch.inference_mode(False), torch.no_grad():
            self._cache = KernelCache.of(params, self.branches())
        return self._cache.kernel

    def train(self, mode: bool = True) -> 'OREPAConv2d':
        self._cache = None
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state['_cache'] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        if self._weight_handout is not None:
            self.apply_weight_writes()
        x, padding = self._pad_input(x)
        params = list(self.branches.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            # Traced by dynamo; and in eval mode (input gradients, a teacher run
            # without no_grad), where no backward may ever come to retire a
            # batched generation: this forward's own kernel, never an earlier one.
            if compat.is_compiling() or not self.training:
                return F.conv2d(x, self.branches(), self.bias, self.stride, padding, self.dilation, self.groups)
            return training_conv(self, x, padding)  # generated with the other layers of its shape
        # No gradient for the branches (evaluation, frozen stages): the kernel
        # is a constant until a parameter changes.
        return F.conv2d(x, self._cached_kernel(params), self.bias, self.stride, padding, self.dilation, self.groups)

    def fused_kernel_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        self.apply_weight_writes()
        with torch.no_grad():
            return self.branches().detach().clone(), None if self.bias is None else self.bias.detach().clone()

    # -- loading plain checkpoints ---------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        plain_key = prefix + 'weight'
        branch_prefix = prefix + 'branches.'
        if plain_key in state_dict and not any(k.startswith(branch_prefix) for k in state_dict):
            weight = state_dict.pop(plain_key)
            expected = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
            if tuple(weight.shape) != expected:
                error_msgs.append(f'size mismatch for {plain_key}: copying a plain conv weight of shape '
                                  f'{tuple(weight.shape)} into an OREPAConv2d expecting {expected}')
            else:
                values = {name: t.detach() for name, t in self.branches.state_dict().items()}
                values.update(self.branches.plain_state(weight))
                for name, t in values.items():
                    state_dict[branch_prefix + name] = t
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
