"""The kernel generator: a module that holds branch parameters and
generates one conv kernel, with a hand-written fast path (``generate`` /
``kernel_backward``) that the tests hold to its readable autograd formula
(``reference_kernel``).  The OREPA blocks (:mod:`.orepa_branches`) are
kernel generators."""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import compat

__all__ = ['KernelGenerator']


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
    kernel, or its 1x1 kernel as a matrix) and ``branch_scales``, one row per
    branch with the origin's first: :meth:`plain_state` relies on both.
    """

    def reference_kernel(self) -> Tensor:
        raise NotImplementedError

    def generate(self) -> Tensor:
        """The kernel, without autograd (a fresh tensor)."""
        with torch.no_grad():
            return self.reference_kernel()

    def kernel_backward(self, grad_kernel: Tensor) -> Dict[str, Tensor]:
        """``dL/dp`` by parameter name, given ``dL/dkernel`` (frozen parameters may be left out)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            kernel = self.reference_kernel()
            grads = torch.autograd.grad(kernel, [p for _, p in named], grad_kernel, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}

    def parameter_grads(self, grad_kernel: Tensor, needed: Sequence[bool]) -> List[Optional[Tensor]]:
        """``kernel_backward`` in ``parameters()`` order, ``None`` where not needed."""
        if not any(needed):
            return [None] * len(needed)
        grads = self.kernel_backward(grad_kernel.to(self.branch_scales.dtype))
        return [grads[name] if need else None for (name, _), need in zip(self.named_parameters(), needed)]

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
        the origin holds it at scale 1, every other branch has scale 0."""
        origin = self.weight_origin
        if weight.numel() != origin.numel():
            raise ValueError(f'{type(self).__name__}: a plain kernel of shape {tuple(weight.shape)} does not fit '
                             f'the origin branch of shape {tuple(origin.shape)}')
        scales = torch.zeros_like(self.branch_scales)
        scales[0] = 1
        return {'weight_origin': weight.detach().reshape(origin.shape), 'branch_scales': scales}
