"""The OREPA blocks as kernel generators (see ``docs/method.md``):

* :class:`OREPA1x1Branches`, the 1x1 block;
* :class:`OREPAKxKBranches`, the six-branch k x k block;
* :class:`OREPAStackedBranches`, the "linear deep stem": stacked 3x3 blocks
  composed into one large kernel.

:func:`orepa_mm.layers.orepa.branch_kind` picks one from the kernel size.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import kernels as K
from .base import ConstantBuffers
from .kernel_generator import KernelGenerator, _kaiming_, _rowwise_dot, _scratch, sum_kernels

__all__ = ['OREPA1x1Branches', 'OREPAKxKBranches', 'OREPAStackedBranches']


class OREPA1x1Branches(KernelGenerator):
    """1x1 block: an origin 1x1 kernel plus a "linear-to-identity" pair.

    ``kernel = v[0] * W + v[1] * (B @ A)`` per output channel, with the pair
    ``A: in -> t``, ``B: t -> out`` (grouped), ``t = min(in, out)`` as in the
    reference code (the cheapest width that still reaches every rank); the
    square factor starts as the (grouped) identity, so the pair starts as a
    random 1x1 conv.
    Initial scales: origin 1.0, pair (``'l2i'``) 0.5.  Without ``'l2i'`` in
    ``branches`` the block is its origin alone (the paper's ablation without
    the re-parameterized 1x1).
    """

    BRANCHES = ('origin', 'l2i')
    INIT_SCALES = {'origin': 1.0, 'l2i': 0.5}

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1,
                 branches: Optional[Sequence[str]] = None, scaling: str = 'channel') -> None:
        super().__init__()
        self._init_options(branches, scaling, self.BRANCHES)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        in_g = in_channels // groups
        self.weight_origin = nn.Parameter(torch.empty(out_channels, in_g))
        if self.has('l2i'):
            self.internal = min(in_channels, out_channels)
            self.weight_l2i_first = nn.Parameter(torch.empty(self.internal, in_g))
            self.weight_l2i_second = nn.Parameter(torch.empty(out_channels, self.internal // groups))
        self._new_scales(out_channels)
        self.reset_parameters()

    def reset_parameters(self, single_init: bool = False) -> None:
        g = self.groups
        with torch.no_grad():
            _kaiming_(self.weight_origin)
            if self.has('l2i'):
                if self.internal == self.in_channels:
                    self.weight_l2i_first.copy_(K.grouped_identity(self.internal, self.in_channels // g))
                    _kaiming_(self.weight_l2i_second)
                else:
                    _kaiming_(self.weight_l2i_first)
                    self.weight_l2i_second.copy_(K.grouped_identity(self.out_channels, self.internal // g))
        self.init_scales(self.INIT_SCALES, single_init)

    def branch_zeros(self, branch: str) -> Dict[str, Tensor]:
        return {'origin': {'weight_origin': self.weight_origin},
                'l2i': {'weight_l2i_second': getattr(self, 'weight_l2i_second', None)}}[branch]

    def branch_kernels(self) -> Dict[str, Tensor]:
        v = self.scales()
        kernels = {'origin': K.scale_out_channels(self.weight_origin, v[0])[:, :, None, None]}
        if self.has('l2i'):
            kernels['l2i'] = K.compose_1x1_1x1(self.weight_l2i_first,
                                               K.scale_out_channels(self.weight_l2i_second, v[1]),
                                               self.groups)[:, :, None, None]
        return kernels

    def _grouped(self, t: Tensor) -> Tensor:
        """A ``(rows, cols)`` matrix of a grouped 1x1 conv as ``(groups, rows / groups, cols)``."""
        return t.view(self.groups, t.shape[0] // self.groups, t.shape[1])

    def generate(self) -> Tensor:
        o, v = self.out_channels, self.scales()
        with torch.no_grad():
            if not self.generates('l2i'):
                return torch.mul(self.weight_origin, v[0, :, None])[:, :, None, None]
            # kernel = v0 * W + (v1 * B) @ A; the scaled factor B is no larger than the kernel (t <= in).
            b = self.weight_l2i_second
            second = torch.mul(b, v[1, :, None], out=_scratch.get('s0', b.shape, b))
            shape = (o, self.in_channels // self.groups)
            kernel = b.new_empty(shape)
            torch.bmm(self._grouped(second), self._grouped(self.weight_l2i_first), out=self._grouped(kernel))
            return kernel.addcmul_(self.weight_origin, v[0, :, None])[:, :, None, None]

    def kernel_backward(self, grad_kernel: Tensor) -> Dict[str, Tensor]:
        v = self.scales()
        with torch.no_grad():
            grad = grad_kernel.reshape(self.out_channels, -1)
            grads = {'weight_origin': grad * v[0, :, None]}
            if not self.generates('l2i'):
                grad_scales = _rowwise_dot(grad, self.weight_origin)[None]
                if self.has('l2i'):  # computed on the feature map: its scale gets its gradient there
                    grad_scales = torch.cat([grad_scales, torch.zeros_like(grad_scales)])
                grads.update(self.scale_grads(grad_scales))
                return grads
            first, second = self.weight_l2i_first, self.weight_l2i_second
            grad_g = self._grouped(grad)
            # d/d(v1 * B) = G @ A^T, then split into B's and v1's parts.
            grad_scaled = _scratch.get('s0', second.shape, second)
            torch.bmm(grad_g, self._grouped(first).transpose(1, 2), out=self._grouped(grad_scaled))
            scaled = torch.mul(second, v[1, :, None], out=_scratch.get('s1', second.shape, second))
            grads['weight_l2i_first'] = torch.bmm(self._grouped(scaled).transpose(1, 2), grad_g).view_as(first)
            grads['weight_l2i_second'] = grad_scaled * v[1, :, None]
            grads.update(self.scale_grads(torch.stack([_rowwise_dot(grad, self.weight_origin),
                                                       _rowwise_dot(grad_scaled, second)])))
            return grads


class OREPAKxKBranches(ConstantBuffers, KernelGenerator):
    """The six-branch OREPA block for an odd ``k >= 3``.

    Per output channel ``o`` (``v = scales()``, initial values in brackets):

    ========  =================================================  ======
    origin    ``W0``, a k x k kernel                               0.25
    avg       1x1 kernel times the k x k box ``1 / k^2``           0.25
    prior     1x1 kernel times the frequency-prior basis ``B[o]``  0.0
    1x1_kxk   (identity + ``A``) 1x1 then k x k ``C``              0.5
    1x1       1x1 kernel at the centre                             1.0
    dws       depthwise k x k (8x expansion) then pointwise 1x1    0.5
    ========  =================================================  ======

    ``branches`` keeps a subset (origin always; rows of ``branch_scales`` in
    this order); the default is all six, the paper's block.
    The 1x1-kxk internal width is ``in`` for ``groups <= 4``, else ``2 * in``.
    """

    EXPAND = 8
    BRANCHES = ('origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws')
    INIT_SCALES = {'origin': 0.25, 'avg': 0.25, 'prior': 0.0, '1x1_kxk': 0.5, '1x1': 1.0, 'dws': 0.5}
    #: The branches that are a 1x1 kernel times a fixed k x k pattern, computed as one product.
    PATTERN_BRANCHES = ('avg', 'prior', '1x1')

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1,
                 branches: Optional[Sequence[str]] = None, scaling: str = 'channel') -> None:
        super().__init__()
        self._init_options(branches, scaling, self.BRANCHES)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = k = kernel_size
        in_g = in_channels // groups
        self.patterns = tuple(b for b in self.PATTERN_BRANCHES if self.has(b))
        self.weight_origin = nn.Parameter(torch.empty(out_channels, in_g, k, k))
        for b in self.patterns:
            setattr(self, f'weight_{b}', nn.Parameter(torch.empty(out_channels, in_g)))
        if self.has('1x1_kxk'):
            self.internal = internal = in_channels if groups <= 4 else 2 * in_channels
            self.weight_1x1_kxk_first = nn.Parameter(torch.empty(internal, in_g))
            self.weight_1x1_kxk_second = nn.Parameter(torch.empty(out_channels, internal // groups, k, k))
        if self.has('dws'):
            self.weight_dw = nn.Parameter(torch.empty(self.EXPAND * in_channels, 1, k, k))
            self.weight_pw = nn.Parameter(torch.empty(out_channels, self.EXPAND * in_g))
        self._new_scales(out_channels)
        self.build_constants()
        self.reset_parameters()

    def constant_buffers(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        """``spatial_patterns``: the avg box, the frequency prior and the centre
        tap (those of them in the block) stacked as ``(out, patterns, k*k)``,
        so that the "1x1 kernel times a fixed k x k pattern" branches are a
        single product; ``identity_1x1_kxk``: the identity part of the
        1x1-kxk branch's first factor.  Computed in float64, rounded once to
        ``dtype``."""
        o, k = self.out_channels, self.kernel_size
        centre = torch.zeros(k, k, dtype=torch.float64)
        centre[k // 2, k // 2] = 1
        formulas = {'avg': lambda: K.box_kernel(k, torch.float64).expand(o, k, k),
                    'prior': lambda: K.frequency_prior(o, k, torch.float64), '1x1': lambda: centre.expand(o, k, k)}
        constants = {}
        if self.patterns:
            patterns = torch.stack([formulas[b]() for b in self.patterns], dim=1)
            constants['spatial_patterns'] = patterns.flatten(2).to(dtype=dtype, device=device).contiguous()
        if self.has('1x1_kxk'):
            constants['identity_1x1_kxk'] = K.grouped_identity(self.internal, self.in_channels // self.groups,
                                                               dtype, device)
        return constants

    def reset_parameters(self, single_init: bool = False) -> None:
        with torch.no_grad():
            for name in ('weight_origin', *(f'weight_{b}' for b in self.patterns), 'weight_1x1_kxk_second',
                         'weight_dw', 'weight_pw'):
                if hasattr(self, name):
                    _kaiming_(getattr(self, name))
            if self.has('1x1_kxk'):
                self.weight_1x1_kxk_first.zero_()
        self.init_scales(self.INIT_SCALES, single_init)

    def branch_zeros(self, branch: str) -> Dict[str, Tensor]:
        name = {'origin': 'weight_origin', '1x1_kxk': 'weight_1x1_kxk_second', 'dws': 'weight_pw'}.get(
            branch, f'weight_{branch}')
        return {name: getattr(self, name)}

    def branch_kernels(self) -> Dict[str, Tensor]:
        v = self.scales()
        o, in_g, k = self.out_channels, self.in_channels // self.groups, self.kernel_size
        kernels = {'origin': K.scale_out_channels(self.weight_origin, v[0])}
        for j, b in enumerate(self.patterns):  # a 1x1 kernel times its fixed k x k pattern
            factor = getattr(self, f'weight_{b}') * v[self.row(b), :, None]
            kernels[b] = (factor[:, :, None] * self.spatial_patterns[:, j, None, :]).view(o, in_g, k, k)
        if self.has('1x1_kxk'):
            kernels['1x1_kxk'] = K.compose_1x1_kxk(self.weight_1x1_kxk_first + self.identity_1x1_kxk,
                                                   K.scale_out_channels(self.weight_1x1_kxk_second,
                                                                        v[self.row('1x1_kxk')]), self.groups)
        if self.has('dws'):
            kernels['dws'] = K.dw_pw_to_full(self.weight_dw, K.scale_out_channels(self.weight_pw,
                                                                                  v[self.row('dws')]),
                                             self.EXPAND, self.groups)
        return {b: kernels[b] for b in self.branch_names}

    # -- the fast path -----------------------------------------------------------
    # Work layout: the 1x1-kxk branch is a contraction over its internal width
    # t with (out, k*k) as rows, so it is built as ONE GEMM per group in the
    # layout (out, k*k, in_g), where the avg/prior/1x1 branches also land as a
    # batched rank-3 update; one pass then moves it to the conv layout
    # (out, in_g, k*k) while adding the origin, and the depthwise-separable
    # branch (a batched product over input channels) is added in place.
    def _sizes(self) -> Tuple[int, int, int, int, int, int]:
        g, o, kk = self.groups, self.out_channels, self.kernel_size ** 2
        return g, o, o // g, self.in_channels // g, getattr(self, 'internal', 0) // g, kk

    def _pattern_scales(self, v: Tensor) -> Tensor:
        """Scales of the pattern branches as ``(out, patterns)``.
        (Stacked rows, not ``v[[1, 2, 4]]``: list indexing copies the index
        from the host and synchronises a GPU.)"""
        return torch.stack([v[self.row(b)] for b in self.patterns], dim=1)

    def _factors(self) -> Tensor:
        """The pattern branches' factors stacked as ``(out, patterns, in_g)`` (scratch)."""
        f = self.weight_origin
        factors = [getattr(self, f'weight_{b}') for b in self.patterns]
        return torch.stack(factors, dim=1, out=_scratch.get('factors', (f.shape[0], len(factors), f.shape[1]), f))

    def _first(self) -> Tensor:
        """The 1x1-kxk branch's first factor, identity included (scratch)."""
        eye = self.identity_1x1_kxk
        return torch.add(self.weight_1x1_kxk_first, eye, out=_scratch.get('first', eye.shape, eye))

    def _scaled_pw(self, v: Tensor) -> Tensor:
        """``v_dws * pw`` as ``(groups, in_g, out_g, expand)``: one matrix per input channel (scratch ``s0``)."""
        g, _, o_g, in_g, _, _ = self._sizes()
        v5 = v[self.row('dws')]
        return torch.mul(self.weight_pw.view(g, o_g, in_g, self.EXPAND).transpose(1, 2), v5.view(g, 1, o_g, 1),
                         out=_scratch.get('s0', (g, in_g, o_g, self.EXPAND), v5))

    def generate(self) -> Tensor:
        g, o, o_g, in_g, t_g, kk = self._sizes()
        e, k, v = self.EXPAND, self.kernel_size, self.scales()
        like, get = self.weight_origin, _scratch.get
        with torch.no_grad():
            work = None  # the 1x1-kxk and pattern branches in the work layout (o, kk, in_g)
            if self.generates('1x1_kxk'):  # (v * C) in the work layout (o, kk, t_g), times (A + I)
                second = torch.mul(self.weight_1x1_kxk_second.view(o, t_g, kk).transpose(1, 2),
                                   v[self.row('1x1_kxk'), :, None, None], out=get('s0', (o, kk, t_g), like))
                work = get('s1', (o, kk, in_g), like)
                torch.bmm(second.view(g, o_g * kk, t_g), self._first().view(g, t_g, in_g),
                          out=work.view(g, o_g * kk, in_g))
            if self.patterns:  # avg, prior, centred 1x1: (o, kk, p) @ (o, p, in_g)
                patterns = self.spatial_patterns * self._pattern_scales(v)[:, :, None]  # (o, p, kk)
                if work is None:
                    work = torch.bmm(patterns.transpose(1, 2), self._factors(), out=get('s1', (o, kk, in_g), like))
                else:
                    work.baddbmm_(patterns.transpose(1, 2), self._factors())
            # origin, while moving to the conv layout (o, in_g, kk)
            kernel = like.new_empty(o, in_g, kk)
            origin, v0 = self.weight_origin.view(o, in_g, kk), v[0, :, None, None]
            if work is None:
                torch.mul(origin, v0, out=kernel)
            else:
                torch.addcmul(work.transpose(1, 2), origin, v0, out=kernel)
            if self.has('dws'):  # a product per input channel of (v * pw) (o_g, e) and dw (e, kk)
                pw = self._scaled_pw(v)  # s0 is free again
                separable = get('s1', (g, in_g, o_g, kk), like)  # so is s1
                torch.bmm(pw.view(g * in_g, o_g, e), self.weight_dw.view(g * in_g, e, kk),
                          out=separable.view(g * in_g, o_g, kk))
                kernel.view(g, o_g, in_g, kk).add_(separable.transpose(1, 2))
            return kernel.view(o, in_g, k, k)

    def kernel_backward(self, grad_kernel: Tensor) -> Dict[str, Tensor]:
        g, o, o_g, in_g, t_g, kk = self._sizes()
        e, v = self.EXPAND, self.scales()
        like, get = self.weight_origin, _scratch.get
        with torch.no_grad():
            grad_kernel = grad_kernel.contiguous()
            grad = grad_kernel.view(o, in_g, kk)
            grad_scales: List[Tensor] = [v[0]] * len(self.branch_names)  # rows filled below, stacked at the end
            grads = {'weight_origin': grad_kernel * v[0, :, None, None, None]}
            grad_scales[0] = _rowwise_dot(grad, self.weight_origin.view(o, in_g, kk))
            on_kernel_1x1_kxk = self.generates('1x1_kxk')
            if self.patterns or on_kernel_1x1_kxk:
                grad_work = get('s0', (o, kk, in_g), like)
                grad_work.copy_(grad.transpose(1, 2))
            if self.patterns:  # avg, prior, centred 1x1
                factors = self._factors()
                grad_factors = torch.bmm(self.spatial_patterns, grad_work)  # (o, p, in_g), before scaling
                pattern_grads = torch.mul(grad_factors, factors, out=factors).sum(2)  # (o, p)
                for b, grad_scale in zip(self.patterns, pattern_grads.unbind(1)):
                    grad_scales[self.row(b)] = grad_scale
                grad_factors.mul_(self._pattern_scales(v)[:, :, None])
                for j, b in enumerate(self.patterns):
                    grads[f'weight_{b}'] = grad_factors[:, j].contiguous()
            if on_kernel_1x1_kxk:
                # in the work layout: d/d(v * C) = G_work @ (A + I)^T, d/dA = (v * C)^T @ G_work
                v3 = v[self.row('1x1_kxk'), :, None, None]
                second = get('s1', (o, kk, t_g), like)
                second.copy_(self.weight_1x1_kxk_second.view(o, t_g, kk).transpose(1, 2))
                grad_second = get('s2', (o, kk, t_g), like)
                torch.bmm(grad_work.view(g, o_g * kk, in_g), self._first().view(g, t_g, in_g).transpose(1, 2),
                          out=grad_second.view(g, o_g * kk, t_g))
                grad_scales[self.row('1x1_kxk')] = _rowwise_dot(grad_second, second)
                grads['weight_1x1_kxk_second'] = torch.mul(
                    grad_second.transpose(1, 2), v3).view_as(self.weight_1x1_kxk_second)
                second.mul_(v3)
                grads['weight_1x1_kxk_first'] = torch.bmm(second.view(g, o_g * kk, t_g).transpose(1, 2),
                                                          grad_work.view(g, o_g * kk, in_g)).view(-1, in_g)
            elif self.has('1x1_kxk'):  # computed on the feature map: its scale gets its gradient there
                grad_scales[self.row('1x1_kxk')] = torch.zeros_like(v[0])
            if self.has('dws'):
                # batched over input channels: (o_g, kk) x (kk, e) and (e, o_g) x (o_g, kk)
                grad_io = get('s1', (g, in_g, o_g, kk), like)  # s1, s2 are free again
                grad_io.copy_(grad.view(g, o_g, in_g, kk).transpose(1, 2))
                dw = self.weight_dw.view(g * in_g, e, kk)
                grad_pw_io = torch.bmm(grad_io.view(g * in_g, o_g, kk), dw.transpose(1, 2),
                                       out=get('s2', (g * in_g, o_g, e), like))
                grad_pw = like.new_empty(o, in_g * e)  # (a reshape could alias the scratch buffer)
                grad_pw.view(g, o_g, in_g, e).copy_(grad_pw_io.view(g, in_g, o_g, e).transpose(1, 2))
                grad_scales[self.row('dws')] = _rowwise_dot(grad_pw, self.weight_pw)
                grads['weight_pw'] = grad_pw.mul_(v[self.row('dws'), :, None])
                pw = self._scaled_pw(v)  # and s0
                grads['weight_dw'] = torch.bmm(pw.view(g * in_g, o_g, e).transpose(1, 2),
                                               grad_io.view(g * in_g, o_g, kk)).view_as(self.weight_dw)
            grads.update(self.scale_grads(torch.stack(grad_scales)))
            return grads


class OREPAStackedBranches(KernelGenerator):
    """Large kernel as the composition of stacked 3x3 OREPA kernels (the
    paper's "linear deep stem"), plus an origin k x k kernel.

    ``kernel = v[0] * W0 + v[1] * compose(K_1, ..., K_n)``, ``n = (k - 1) / 2``
    3x3 :class:`OREPAKxKBranches` generators (``in -> out -> ... -> out``).
    ``compose`` is the true kernel of the stacked stride-1 linear convs
    (:func:`orepa_mm.kernels.compose_stack`).  The reference code instead
    cross-correlates the 3x3 kernels, which gives a trainable 7x7 kernel but
    not the kernel of the stack; its checkpoints convert exactly by flipping
    (see ``tools/model_converters/convert_reference_checkpoint.py``).  The origin branch
    (initial scale 0; the stack starts at scale 1, as in the paper) exists so
    that a plain k x k checkpoint, e.g. an ImageNet ResNet stem, loads
    exactly: a product of 3x3 kernels cannot represent every 7x7 kernel.
    Groups are supported (every stacked conv uses them); dilation and stride
    apply to the composed kernel as a whole.  Without ``'deep_stem'`` in
    ``branches`` the block is its origin alone (a plain large conv, scale 1).
    """

    BRANCHES = ('origin', 'deep_stem')

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1,
                 branches: Optional[Sequence[str]] = None, scaling: str = 'channel') -> None:
        super().__init__()
        self._init_options(branches, scaling, self.BRANCHES)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = kernel_size
        n = (kernel_size - 1) // 2 if self.has('deep_stem') else 0
        # The stacked 3x3 blocks have the same branch and scaling options as the layer.
        self.stack = nn.ModuleList(
            OREPAKxKBranches(in_channels if i == 0 else out_channels, out_channels, 3, groups, branches, scaling)
            for i in range(n))
        self.weight_origin = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self._new_scales(out_channels)
        self.reset_parameters()

    def reset_parameters(self, single_init: bool = False) -> None:
        with torch.no_grad():
            _kaiming_(self.weight_origin)
            for layer in self.stack:
                layer.reset_parameters()
        # The stack starts alone at scale 1 (the origin at 0); without it the origin is the block.
        self.init_scales({'origin': 0.0 if self.has('deep_stem') else 1.0, 'deep_stem': 1.0}, single_init)

    def branch_zeros(self, branch: str) -> Dict[str, Tensor]:
        if branch == 'origin':
            return {'weight_origin': self.weight_origin}
        last = len(self.stack) - 1  # a zero last kernel makes the composition zero
        return {f'stack.{last}.{name}': t for b in self.stack[last].branch_names
                for name, t in self.stack[last].branch_zeros(b).items()}

    def branch_kernels(self, sub_kernel: Optional[Callable[[nn.Module], Tensor]] = None) -> Dict[str, Tensor]:
        """Each branch's scaled kernel; ``sub_kernel(generator)`` gives the
        stacked 3x3 kernels (default: their own forward)."""
        v = self.scales()
        kernels = {'origin': K.scale_out_channels(self.weight_origin, v[0])}
        if self.has('deep_stem'):
            stacked = K.compose_stack([sub_kernel(layer) if sub_kernel else layer() for layer in self.stack],
                                      self.groups)
            kernels['deep_stem'] = K.scale_out_channels(stacked, v[1])
        return kernels

    def reference_kernel(self, sub_kernel: Optional[Callable[[nn.Module], Tensor]] = None) -> Tensor:
        """The kernel: the sum of :meth:`branch_kernels`."""
        return sum_kernels(self.branch_kernels(sub_kernel).values())
