"""The generated kernel that an OREPA layer reuses when its branches need no gradient.

In evaluation, in frozen stages and in a second model that is updated
without autograd (an EMA copy, a momentum encoder, a mean teacher), the
kernel is a function of the branch parameters alone, so it is generated once
and reused: unfused evaluation then costs one plain conv per layer.

What invalidates it, in one place: **any difference between the bytes of a
branch parameter now and a copy of them taken when the kernel was
generated**, or in its dtype, device or shape.  Nothing else is trusted:

* PyTorch's version counters miss writes through ``p.data`` (``mul_``,
  ``add_``, ``lerp_``, ``copy_``, ``_foreach_*`` on ``.data``: how mmengine's
  ``ExponentialMovingAverage``, ``EMAHook`` and mmdet's ``MeanTeacherHook``
  average), because ``.data`` is a new tensor with a counter of its own;
* storage addresses miss a ``p.data = t`` that reuses freed memory;
* ``train()``/``eval()`` are not called by every framework between writes.

Comparing the bytes catches all of these and also optimizer steps,
``load_state_dict``, ``.to()``/``.half()`` and DDP/FSDP re-pointing.  The
comparison is exact: a kernel is reused only if every parameter holds the
very bits it was generated from (so the reused kernel is bitwise the one a
new generation would give; ``-0.0`` against ``0.0`` regenerates).  Its cost is
one read of the branch parameters and of their copy per forward and the
copy's memory while the cache is held.  On the CPU the comparison is the C
library's ``memcmp`` (about twice as fast as ``torch.equal``, which is what
keeps unfused evaluation near the fused model's cost); on an accelerator it
is one elementwise compare per layer and one synchronisation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['KernelCache', 'same_bytes']


class KernelCache(NamedTuple):
    """A kernel and copies of the parameter values it was generated from."""

    kernel: Tensor
    #: Contiguous copies: their dtype, device and shape are compared too.
    values: Tuple[Tensor, ...]

    @classmethod
    def of(cls, params: Sequence[Tensor], kernel: Tensor) -> 'KernelCache':
        """The cache of ``kernel``, generated from ``params`` as they are now."""
        return cls(kernel, tuple(p.detach().clone(memory_format=torch.contiguous_format) for p in params))

    def holds(self, params: Sequence[Tensor]) -> bool:
        """Whether ``params`` hold bitwise the values the kernel was generated from."""
        return same_bytes(params, self.values)


def same_bytes(tensors: Sequence[Tensor], copies: Sequence[Tensor]) -> bool:
    """Whether each tensor has the dtype, shape and device of its contiguous
    copy and holds the same bytes."""
    if len(tensors) != len(copies):
        return False
    elsewhere = []
    for t, c in zip(tensors, copies):
        if t.dtype != c.dtype or t.shape != c.shape or t.is_cpu != c.is_cpu:
            return False
        if t.is_cpu:
            if not _same_bytes_cpu(t, c):
                return False
        elif t.device != c.device:
            return False
        else:
            elsewhere.append((t.detach(), c))
    if not elsewhere:
        return True
    # One synchronisation for the layer, not one per parameter.
    differs = [(_as_bits(t) != _as_bits(c)).any() for t, c in elsewhere]
    return not bool(torch.stack(differs).any())


def _same_bytes_cpu(t: Tensor, c: Tensor) -> bool:
    size = t.numel() * t.element_size()
    if size == 0:
        return True
    if _memcmp is None or not t.is_contiguous():
        return torch.equal(_as_bits(t.detach()), _as_bits(c))
    return _memcmp(t.data_ptr(), c.data_ptr(), size) == 0


def _as_bits(t: Tensor) -> Tensor:
    """``t`` as integers of its width, so that comparing compares bits (NaN
    equals the same NaN, ``-0.0`` differs from ``0.0``)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    if bits is None or t.dtype == torch.bool or t.is_complex():
        return t
    return t.view(bits)


def _load_memcmp() -> Optional[Callable[[int, int, int], int]]:
    name = ctypes.util.find_library('c') or ctypes.util.find_library('msvcrt')
    try:
        memcmp = ctypes.CDLL(name).memcmp
    except (OSError, AttributeError, TypeError):
        return None  # torch.equal on the integer view instead: exact too, slower
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_memcmp = _load_memcmp()
