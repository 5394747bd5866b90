"""Kernel algebra for structural re-parameterization, as small pure functions.

Every function here maps kernels (and BN statistics) to kernels; none owns
state.  The OREPA and DBB layers build their training-time kernels from them,
and :func:`orepa_mm.fuse_model` and the checkpoint tools fold with them, so a
formula exists once.

Conventions: a conv kernel has the layout of ``nn.Conv2d.weight``:
``(out_channels, in_channels // groups, kh, kw)``; a "1x1 kernel" may be given
as ``(out, in // groups)`` or ``(out, in // groups, 1, 1)``.  Composition
follows the order in which the convs are applied to the input (first kernel
first) and yields the kernel of the single conv that computes the same linear
map (PyTorch convs are cross-correlations; the maths below accounts for it).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'as_matrix', 'fold_bn', 'fold_bias_into_bn', 'pad_to_kxk', 'box_kernel',
    'frequency_prior', 'grouped_identity', 'compose_1x1_kxk', 'dw_pw_to_full',
    'compose_kernels', 'compose_stack', 'scale_out_channels', 'conv_of_constant',
]


def as_matrix(kernel: Tensor) -> Tensor:
    """View a 1x1 kernel ``(out, in_g[, 1, 1])`` as a matrix ``(out, in_g)``."""
    if kernel.dim() == 4:
        if kernel.shape[2:] != (1, 1):
            raise ValueError(f'expected a 1x1 kernel, got shape {tuple(kernel.shape)}')
        return kernel.flatten(1)
    return kernel


def scale_out_channels(kernel: Tensor, scale: Tensor) -> Tensor:
    """Multiply output channel ``o`` of a kernel of any rank by ``scale[o]``."""
    return kernel * scale.reshape((-1,) + (1,) * (kernel.dim() - 1))


def fold_bn(kernel: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
            bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
            eps: float) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv.

    ``BN(conv(x, W) + b) == conv(x, W') + b'`` with
    ``W' = W * g / s``, ``b' = beta + (b - mean) * g / s``, ``s = sqrt(var + eps)``.
    ``bn_weight``/``bn_bias`` may be ``None`` (an affine-free BN).
    """
    std = (running_var + eps).sqrt()
    gamma = bn_weight if bn_weight is not None else torch.ones_like(std)
    beta = bn_bias if bn_bias is not None else torch.zeros_like(std)
    bias = bias if bias is not None else torch.zeros_like(running_mean)
    factor = gamma / std
    return scale_out_channels(kernel, factor), beta + (bias - running_mean) * factor


def fold_bias_into_bn(bias: Tensor, running_mean: Tensor) -> Tensor:
    """Running mean that absorbs a conv bias: ``BN(y + b)`` with mean ``m``
    equals ``BN(y)`` with mean ``m - b`` (eval mode)."""
    return running_mean - bias


def conv_of_constant(kernel: Tensor, value: Tensor, groups: int = 1) -> Tensor:
    """Output ``(out,)`` of a grouped conv with ``kernel`` ``(out, t // g, kh, kw)``
    on an input that equals ``value[c]`` everywhere on channel ``c``, padding
    included: ``sum_{t, h, w} kernel[o, t, h, w] * value[group(o) * t_g + t]``.

    This is how a bias before a conv passes through it, exactly when the conv
    pads with that bias instead of zeros (DBB's BN-and-pad).
    """
    out, t_g = kernel.shape[:2]
    if value.numel() != t_g * groups:
        raise ValueError(f'{value.numel()} input values do not feed a kernel {tuple(kernel.shape)} '
                         f'with groups={groups}')
    taps = kernel.sum(dim=(2, 3)).reshape(groups, out // groups, t_g)
    return (taps * value.reshape(groups, 1, t_g)).sum(-1).reshape(out)


def pad_to_kxk(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a centred ``(out, in_g, k0, k0)`` kernel (k0 odd) to ``k x k``.

    A 1x1 kernel becomes a k x k kernel with its value at the centre; run with
    the k x k conv's padding it computes what the 1x1 conv computes with
    ``padding - dilation * (k // 2)``.
    """
    if kernel.dim() == 2:
        kernel = kernel[:, :, None, None]
    k0 = kernel.shape[-1]
    if kernel.shape[-2] != k0 or k0 % 2 == 0 or kernel_size % 2 == 0 or k0 > kernel_size:
        raise ValueError(f'cannot centre a {tuple(kernel.shape[-2:])} kernel in {kernel_size}x{kernel_size}')
    pad = (kernel_size - k0) // 2
    return F.pad(kernel, [pad, pad, pad, pad])


def box_kernel(kernel_size: int, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> Tensor:
    """The ``k x k`` average-pooling window, ``1 / k^2`` everywhere.

    Equals ``avg_pool2d(count_include_pad=True)`` when used as a depthwise
    kernel with the pool's stride and zero padding.
    """
    return torch.full((kernel_size, kernel_size), 1.0 / kernel_size ** 2, dtype=dtype, device=device)


def frequency_prior(out_channels: int, kernel_size: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> Tensor:
    """OREPA's frequency-prior basis ``(out, k, k)``, one DCT-like filter per
    output channel (the FcaNet idea), valid for every ``k >= 1``.

    Output channels ``o < out / 2`` vary along the height:
    ``cos(pi * (h + 0.5) * (o + 1) / k)``; the others along the width:
    ``cos(pi * (w + 0.5) * (o + 1 - out / 2) / k)``.  For ``k = 3`` this is the
    reference code's basis, which its loops build for 3x3 only (other sizes
    are left uninitialised or crash there; see ``docs/method.md``).
    """
    pos = (torch.arange(kernel_size, dtype=torch.float64) + 0.5) * math.pi / kernel_size
    o = torch.arange(out_channels, dtype=torch.float64)
    half = out_channels / 2
    along_h = o < half
    freq = torch.where(along_h, o + 1, o + 1 - half)
    wave = torch.cos(freq[:, None] * pos[None, :])  # (out, k)
    basis = torch.where(along_h[:, None, None], wave[:, :, None].expand(-1, -1, kernel_size),
                        wave[:, None, :].expand(-1, kernel_size, -1))
    return basis.to(dtype=dtype, device=device).contiguous()


def grouped_identity(channels: int, in_per_group: int, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> Tensor:
    """The ``(channels, in_per_group)`` matrix with ``I[t, t % in_per_group] = 1``.

    As a grouped 1x1 kernel with ``channels == in_channels`` it is the
    identity map; with ``channels = m * in_channels`` it copies each input
    channel ``m`` times within its group.
    """
    eye = torch.zeros(channels, in_per_group, dtype=dtype, device=device)
    eye[torch.arange(channels), torch.arange(channels) % in_per_group] = 1
    return eye


def compose_1x1_kxk(first_1x1: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Kernel of a grouped 1x1 conv (``in -> t``) followed by a grouped
    ``k x k`` conv (``t -> out``), both with ``groups`` groups.

    ``first_1x1``: ``(t, in // g[, 1, 1])``; ``second``: ``(out, t // g, k, k)``.
    Returns ``(out, in // g, k, k)``.  Exact when the 1x1 conv has no bias
    (zero padding commutes with it).
    """
    a = as_matrix(first_1x1)
    t, in_g = a.shape
    out, t_g, kh, kw = second.shape
    a = a.reshape(groups, t // groups, in_g)
    b = second.reshape(groups, out // groups, t_g, kh * kw)
    return torch.einsum('gotk,gti->goik', b, a).reshape(out, in_g, kh, kw)


def compose_1x1_1x1(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Kernel ``(out, in // g)`` of two grouped 1x1 convs, ``first`` applied first."""
    return compose_1x1_kxk(first, as_matrix(second)[:, :, None, None], groups)[:, :, 0, 0]


def dw_pw_to_full(depthwise: Tensor, pointwise: Tensor, expand: int, groups: int = 1) -> Tensor:
    """Kernel of a depthwise ``k x k`` conv with channel multiplier ``expand``
    (``in -> expand * in``, weight ``(expand * in, 1, k, k)``, channel
    ``expand * i + j`` reading input ``i``) followed by a grouped pointwise
    conv (``expand * in -> out``, weight ``(out, expand * in // g[, 1, 1])``),
    with no non-linearity in between.  Returns ``(out, in // g, k, k)``.
    """
    pw = as_matrix(pointwise)
    et, _, kh, kw = depthwise.shape
    out, width = pw.shape
    if width * groups != et or et % (expand * groups):
        raise ValueError(f'depthwise kernel {tuple(depthwise.shape)} does not feed pointwise '
                         f'kernel {tuple(pointwise.shape)} with expand={expand}, groups={groups}')
    in_g = et // expand // groups
    dw = depthwise.reshape(groups, in_g, expand, kh * kw)
    pw = pw.reshape(groups, out // groups, in_g, expand)
    return torch.einsum('goie,giek->goik', pw, dw).reshape(out, in_g, kh, kw)


def compose_kernels(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """Kernel of conv(``first``) followed by conv(``second``), stride 1, both
    grouped with ``groups``; spatial sizes add: ``(a + b - 1)``.

    For cross-correlations ``y = x * K1`` then ``z = y * K2`` the single
    kernel is ``K[o, i](w) = sum_t sum_{u + v = w} K2[o, t](v) K1[t, i](u)``,
    a true convolution of the two kernels.  ``conv2d`` computes
    cross-correlations, so the second kernel is flipped; the reference code
    omits the flip and so does not produce the kernel of the stacked convs
    (``docs/method.md``).
    """
    b = second.shape[-1] - 1
    # Treat first's input-channel axis as the batch: (in_g, t, a, a).
    composed = F.conv2d(first.transpose(0, 1), second.flip(-1, -2), padding=b, groups=groups)
    return composed.transpose(0, 1).contiguous()


def compose_stack(kernels: Sequence[Tensor], groups: int = 1) -> Tensor:
    """Kernel of a stack of stride-1 linear convs, ``kernels[0]`` applied first."""
    composed = kernels[0]
    for k in kernels[1:]:
        composed = compose_kernels(composed, k, groups)
    return composed


def cross_correlate_kernels(first: Tensor, second: Tensor, groups: int = 1) -> Tensor:
    """The reference code's stem composition: ``conv2d(first^T, second,
    padding=b)`` without the flip.  Only for converting its checkpoints."""
    b = second.shape[-1] - 1
    return F.conv2d(first.transpose(0, 1), second, padding=b, groups=groups).transpose(0, 1).contiguous()
