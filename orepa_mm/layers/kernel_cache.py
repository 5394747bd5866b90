"""The generated kernel that an OREPA layer reuses when its branches need no gradient.

In evaluation, in frozen stages and in a second model that is updated
without autograd (an EMA copy, a momentum encoder, a mean teacher), the
kernel is a function of the branch parameters alone, so it is generated once
and reused: unfused evaluation then costs one plain conv per layer.

What invalidates it, in one place: **any difference between a branch
parameter now and a copy of its values taken when the kernel was
generated**, including its dtype and device.  Nothing else is trusted:

* PyTorch's version counters miss writes through ``p.data`` (``mul_``,
  ``add_``, ``lerp_``, ``copy_``, ``_foreach_*`` on ``.data``: how mmengine's
  ``ExponentialMovingAverage``, ``EMAHook`` and mmdet's ``MeanTeacherHook``
  average), because ``.data`` is a new tensor with a counter of its own;
* storage addresses miss a ``p.data = t`` that reuses freed memory;
* ``train()``/``eval()`` are not called by every framework between writes.

Comparing values catches all of these and also optimizer steps,
``load_state_dict``, ``.to()``/``.half()`` and DDP/FSDP re-pointing.  The
comparison is exact: a kernel is reused only if every parameter is bitwise
what it was (NaN never compares equal, so a NaN parameter regenerates each
time, which is correct too).  Its cost is one read of the branch parameters
per forward (an elementwise compare, no arithmetic on the feature map) and
one copy of them in memory while the cache is held; the README's training
cost section gives the measured eval-time overhead.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['KernelCache']


class KernelCache(NamedTuple):
    """A kernel and the exact parameter values it was generated from."""

    #: What the parameters were (dtype, device, shape), compared before the values.
    layout: Tuple[Tuple[torch.dtype, torch.device, torch.Size], ...]
    kernel: Tensor
    values: Tuple[Tensor, ...]

    @classmethod
    def of(cls, params: Sequence[Tensor], kernel: Tensor) -> 'KernelCache':
        """The cache of ``kernel``, generated from ``params`` as they are now."""
        return cls(_layout(params), kernel, tuple(p.detach().clone() for p in params))

    def holds(self, params: Sequence[Tensor]) -> bool:
        """Whether ``params`` are bitwise the values the kernel was generated from."""
        return _layout(params) == self.layout and all(torch.equal(p.detach(), v) for p, v in zip(params, self.values))


def _layout(params: Sequence[Tensor]) -> tuple:
    return tuple((p.dtype, p.device, p.shape) for p in params)
