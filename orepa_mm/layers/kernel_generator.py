"""The kernel generator: a module that holds branch parameters and
generates one conv kernel, with a hand-written fast path (``generate`` /
``kernel_backward``) that the tests hold to its readable autograd formula
(``reference_kernel``).  The OREPA blocks (:mod:`.orepa_branches`) are
kernel generators."""
from __future__ import annotations

import functools
import math
import operator
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import compat

__all__ = ['KernelGenerator', 'ALL_BRANCHES', 'SCALINGS', 'check_branch_options']

#: Every branch name of the OREPA blocks, for ``OREPAConv2d(branches=...)``:
#: the k x k block's six, the 1x1 block's linear-to-identity pair (``'l2i'``,
#: the paper's "re-parameterized 1x1") and the large kernel's stacked 3x3
#: blocks (``'deep_stem'``, the "linear deep stem").  Each block keeps the
#: named branches it has; ``'origin'`` is every block's.
ALL_BRANCHES = ('origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws', 'l2i', 'deep_stem')
#: The scaling options: a scale per branch and channel, one per branch, or none.
SCALINGS = ('channel', 'scalar', 'none')


class _Scratch(threading.local):
    """Reusable buffers for the temporaries of kernel generation, per thread.

    On CPU a fresh large tensor costs a page fault per 4 KiB page on first
    touch (glibc serves big allocations with new mappings), and generating
    and differentiating a kernel needs several kernel-sized temporaries per
    layer and step: measured, those faults cost more than the arithmetic.
    Layers run one after the other, so one buffer per role, grown to the
    largest layer, serves them all (a few times the largest kernel in all).
    On other devices the caching allocator already reuses memory and the
    buffers are plain fresh tensors.  A buffer is only valid until the next
    call that asks for the same role: nothing built in one may escape.
    Roles: ``s0``-``s2`` (kernel-sized working buffers, reused within one
    ``generate``/``kernel_backward`` once their content is dead), ``dot``,
    ``first`` and ``factors``.
    """

    def __init__(self) -> None:
        self.buffers: Dict[Tuple[str, torch.dtype], Tensor] = {}

    def get(self, role: str, shape: Sequence[int], like: Tensor) -> Tensor:
        if like.device.type != 'cpu':
            return like.new_empty(shape)
        numel = math.prod(shape)
        key = (role, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable outside inference mode later on
                buf = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buf[:numel].view(shape)


_scratch = _Scratch()


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j a[o, ..] * b[o, ..]`` for every row ``o`` (same shapes)."""
    return torch.mul(a, b, out=_scratch.get('dot', a.shape, a)).flatten(1).sum(1)


def sum_kernels(kernels: Iterable[Tensor]) -> Tensor:
    """The sum of the branch kernels (without ``sum()``'s extra ``0 +``, an operator per call)."""
    return functools.reduce(operator.add, kernels)


def _kaiming_(t: Tensor) -> Tensor:
    # The reference initialises every kernel with kaiming_uniform_(a=0);
    # fan-in is computed from the 4-D conv layout.
    shape = t.shape
    view = t.view(shape[0], -1, 1, 1) if t.dim() == 2 else t
    nn.init.kaiming_uniform_(view, a=0.0)
    return t


class _GeneratedKernel(torch.autograd.Function):
    """Autograd node of a kernel generator: ``generate()`` forward, the
    generator's analytic ``kernel_backward()`` backward."""

    @staticmethod
    def forward(ctx, generator: 'KernelGenerator', *params: Tensor) -> Tensor:
        ctx.generator = generator
        return generator.generate()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kernel: Tensor):
        grads = ctx.generator.parameter_grads(grad_kernel, ctx.needs_input_grad[1:])
        return (None, *grads)


class KernelGenerator(nn.Module):
    """A module that holds branch parameters and generates one conv kernel.

    ``forward()`` takes no input and returns the kernel.  Subclasses write the
    kernel twice:

    * ``reference_kernel()``: the readable formula, built from
      :mod:`orepa_mm.kernels` with plain autograd.  It is the definition; the
      tests hold the fast path to it.
    * ``generate()`` / ``kernel_backward(grad)``: the same kernel and its
      parameter gradients computed by hand, with few large GEMMs, in-place
      accumulation and no autograd graph.  In training they run once per
      step for a whole group of same-shape layers, on a generator ``n``
      times as wide (:mod:`orepa_mm.layers.batched_generation`), so that the
      operator count of a step does not grow with the depth.

    The default ``generate``/``kernel_backward`` fall back to the reference.

    Every OREPA block has an origin branch ``weight_origin`` (the layer's
    kernel, or its 1x1 kernel as a matrix) and, unless ``scaling='none'``,
    ``branch_scales``: one row per branch of :attr:`branch_names`, origin
    first.  The scaling options (the paper's ablation of the linear scaling
    layers):

    * ``'channel'`` (default, the paper's block): a learnable scale per
      branch and output channel, ``branch_scales`` of shape ``(rows, out)``;
    * ``'scalar'``: one learnable scale per branch, ``(rows, 1)``;
    * ``'none'``: no scaling layer, the branches are summed as they are.

    The fast path and the reference read the scales through :meth:`scales`
    (always ``(rows, out)``) and hand their gradient to :meth:`scale_grads`,
    so that one code serves every option.
    """

    branch_names: Tuple[str, ...] = ()
    scaling: str = 'channel'
    #: Branches left out of the generated kernel because the layer computes
    #: them on the feature map (:mod:`.feature_path`).  Only the virtual
    #: generators of batched generation set it; a layer's own generator
    #: always generates its whole kernel.
    kernel_without: Tuple[str, ...] = ()

    def _init_options(self, branches: Optional[Sequence[str]], scaling: str, own: Sequence[str]) -> None:
        """Keep the branches of ``own`` named in ``branches`` (all when None;
        see :func:`check_branch_options`) and the scaling option."""
        check_branch_options(branches, scaling)
        self.branch_names = tuple(b for b in own if branches is None or b in branches)
        self.scaling = scaling

    def _new_scales(self, out_channels: int) -> None:
        rows = len(self.branch_names)
        if self.scaling != 'none':
            self.branch_scales = nn.Parameter(torch.empty(rows, out_channels if self.scaling == 'channel' else 1))

    def row(self, branch: str) -> int:
        """The row of ``branch`` in :meth:`scales`."""
        return self.branch_names.index(branch)

    def has(self, branch: str) -> bool:
        return branch in self.branch_names

    def generates(self, branch: str) -> bool:
        """Whether the generated kernel includes ``branch`` (has it, and does not leave it out)."""
        return branch in self.branch_names and branch not in self.kernel_without

    def scales(self) -> Tensor:
        """The branches' scales per output channel, ``(rows, out_channels)``.

        For ``'scalar'`` each layer's scale is repeated over its channels; a
        virtual generator of ``n`` layers (batched generation) holds ``n``
        columns, one per layer, for its ``n * out`` channels."""
        if self.scaling == 'channel':
            return self.branch_scales
        out = self.weight_origin.shape[0]
        if self.scaling == 'none':
            return self.weight_origin.new_ones(len(self.branch_names), out)
        v = self.branch_scales  # (rows, layers)
        rows, layers = v.shape
        return v[:, :, None].expand(rows, layers, out // layers).reshape(rows, out)

    def scale_grads(self, grad_scales: Tensor) -> Dict[str, Tensor]:
        """``{'branch_scales': dL/dv}`` from the gradient of :meth:`scales` (nothing for ``'none'``)."""
        if self.scaling == 'channel':
            return {'branch_scales': grad_scales}
        if self.scaling == 'none':
            return {}
        rows, layers = self.branch_scales.shape
        return {'branch_scales': grad_scales.view(rows, layers, -1).sum(2)}

    def init_scales(self, values: Dict[str, float], single_init: bool) -> None:
        """Initial scales by branch name (``single_init``: origin 1, others 0);
        with ``'none'``, single_init zeroes the other branches instead."""
        others = [b for b in self.branch_names if b != 'origin']
        with torch.no_grad():
            if self.scaling == 'none':
                if single_init:
                    for b in others:
                        for t in self.branch_zeros(b).values():
                            t.zero_()
                return
            for i, b in enumerate(self.branch_names):
                self.branch_scales[i].fill_((1.0 if b == 'origin' else 0.0) if single_init else values[b])

    def branch_zeros(self, branch: str) -> Dict[str, Tensor]:
        """The tensors of ``branch`` (by state-dict name) whose zeroing makes the branch contribute nothing."""
        raise NotImplementedError

    def branch_kernels(self) -> Dict[str, Tensor]:
        """Each branch's contribution to the kernel (scaled), by branch name in
        :attr:`branch_names` order, with autograd: the block's definition."""
        raise NotImplementedError

    def reference_kernel(self) -> Tensor:
        """The kernel as the readable formula: the sum of :meth:`branch_kernels`
        (those not in :attr:`kernel_without`)."""
        return sum_kernels(k for b, k in self.branch_kernels().items() if b not in self.kernel_without)

    def generate(self) -> Tensor:
        """The kernel, without autograd (a fresh tensor)."""
        with torch.no_grad():
            return self.reference_kernel()

    def kernel_backward(self, grad_kernel: Tensor) -> Dict[str, Tensor]:
        """``dL/dp`` by parameter name, given ``dL/dkernel``.  Frozen parameters
        and those only of branches in :attr:`kernel_without` may be left out."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            kernel = self.reference_kernel()
            grads = torch.autograd.grad(kernel, [p for _, p in named], grad_kernel, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}

    def parameter_grads(self, grad_kernel: Tensor, needed: Sequence[bool]) -> List[Optional[Tensor]]:
        """``kernel_backward`` in ``parameters()`` order, ``None`` where not needed."""
        if not any(needed):
            return [None] * len(needed)
        grads = self.kernel_backward(grad_kernel.to(self.weight_origin.dtype))
        return [grads.get(name) if need else None for (name, _), need in zip(self.named_parameters(), needed)]

    def forward(self) -> Tensor:
        params = tuple(self.parameters())
        # The kernel is a weight: generated in the parameters' dtype, like
        # nn.Conv2d's, whatever autocast then does to the conv.
        with torch.autocast(params[0].device.type, enabled=False):
            if compat.is_compiling():  # the plain formula: dynamo traces it like any other ops
                return self.reference_kernel()
            if torch.is_grad_enabled() and any(p.requires_grad for p in params):
                return _GeneratedKernel.apply(self, *params)
            return self.generate()

    def plain_state(self, weight: Tensor) -> Dict[str, Tensor]:
        """Branch values that make the block compute the plain conv kernel
        ``weight`` (``(out, in // groups, k, k)``, or a 1x1 kernel as a matrix):
        the origin holds it at scale 1, every other branch has scale 0 (with
        ``scaling='none'``: every other branch has its last factor zeroed)."""
        origin = self.weight_origin
        if weight.numel() != origin.numel():
            raise ValueError(f'{type(self).__name__}: a plain kernel of shape {tuple(weight.shape)} does not fit '
                             f'the origin branch of shape {tuple(origin.shape)}')
        state = {'weight_origin': weight.detach().reshape(origin.shape)}
        if self.scaling == 'none':
            for b in self.branch_names[1:]:
                state.update({name: torch.zeros_like(t) for name, t in self.branch_zeros(b).items()})
        else:
            scales = torch.zeros_like(self.branch_scales)
            scales[0] = 1
            state['branch_scales'] = scales
        return state


def check_branch_options(branches: Optional[Sequence[str]], scaling: str) -> None:
    """Refuse unknown branch names, a branch set without ``'origin'`` and unknown scaling options."""
    if scaling not in SCALINGS:
        raise ValueError(f'scaling={scaling!r}: choose one of {SCALINGS}')
    if branches is None:
        return
    if isinstance(branches, str):
        raise ValueError(f'branches={branches!r}: give a sequence of branch names, e.g. {ALL_BRANCHES}')
    unknown = [b for b in branches if b not in ALL_BRANCHES]
    if unknown:
        raise ValueError(f'unknown OREPA branch(es) {unknown}: choose from {ALL_BRANCHES}')
    if 'origin' not in branches:
        raise ValueError(f"branches={tuple(branches)}: 'origin' is required (plain checkpoints load into it)")
