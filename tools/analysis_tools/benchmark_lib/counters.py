"""Exact counters of a training step: the bytes autograd saves for backward,
the ATen operators dispatched, and the convolution / matrix-product FLOPs.

They depend only on the model, the input shapes, the dtypes and the device
type, never on the machine's load, so they are what a CI check can compare.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


# ---------------------------------------------------------------------------
# Bytes kept for backward
# ---------------------------------------------------------------------------
def _storage_key(t: Tensor) -> Tuple[str, int]:
    """Identity of the memory block behind ``t`` (views share it)."""
    return str(t.device), t.untyped_storage().data_ptr()


class SavedTensorCounter:
    """Context manager counting the bytes autograd saves for backward.

    Every tensor that autograd saves while the context is active is recorded
    (weakly: the counter keeps nothing alive).  On exit, the storages of the
    saved tensors that a graph still holds (graphs dropped before backward do
    not count) are counted once each (views, and tensors saved by several
    nodes, share one storage), at their full size.  Storages of the tensors
    in ``exclude`` (the model's parameters and buffers: they exist whether or
    not a graph is built) are left out.  The count depends only on the model,
    the input and the dtypes, not on the device or the allocator.

    Read :attr:`nbytes` / :attr:`num_storages` after the ``with`` block,
    while the output (and so the graph) is still alive::

        with SavedTensorCounter(model.parameters()) as counter:
            loss = model(x).sum()
        print(counter.nbytes)
        loss.backward()
    """

    def __init__(self, exclude: Union[Iterable[Tensor], Callable[[], Iterable[Tensor]]] = ()) -> None:
        # A callable is read on exit: a model may move its parameters' data
        # during the forward (OREPA packs same-shape layers on first use).
        self._exclude = exclude
        self._saved: List[weakref.ReferenceType] = []
        self._hooks: Optional[contextlib.AbstractContextManager] = None
        self.nbytes = 0
        self.num_storages = 0

    def _pack(self, t: Tensor) -> Tensor:
        # What is returned here is what the graph holds, so a weak reference
        # to it is alive exactly as long as the graph node that saved it.
        # Trainable leaves (parameters) are returned as they are: custom
        # Functions may differentiate with respect to them (OREPA's backward
        # does).  Anything else is returned as a detached alias (same
        # storage): a node saving its own output would otherwise form a
        # reference cycle through ``grad_fn`` that keeps a dropped graph, and
        # an input the caller holds would look "kept" after its graph is gone.
        packed = t if t.requires_grad and t.is_leaf else t.detach()
        self._saved.append(weakref.ref(packed))
        return packed

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> 'SavedTensorCounter':
        self._saved.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        exclude = self._exclude() if callable(self._exclude) else self._exclude
        excluded = {_storage_key(t) for t in exclude}
        storages: Dict[Tuple[str, int], int] = {}
        for ref in self._saved:
            t = ref()
            if t is None:  # its graph was dropped before backward: not kept
                continue
            try:
                key, size = _storage_key(t), t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # no plain storage (sparse, wrapper subclasses)
                key, size = ('id', id(t)), t.numel() * t.element_size()
            if key not in excluded:
                storages[key] = size
        self._saved.clear()
        self.nbytes = sum(storages.values())
        self.num_storages = len(storages)


def count_saved_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> Tuple[int, Any]:
    """Run ``fn()`` under a :class:`SavedTensorCounter`; return (bytes, fn's result)."""
    with SavedTensorCounter(exclude) as counter:
        out = fn()
    return counter.nbytes, out


def model_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Parameters and buffers of ``model`` (their storages exist anyway)."""
    yield from model.parameters()
    yield from model.buffers()


# ---------------------------------------------------------------------------
# Operators dispatched
# ---------------------------------------------------------------------------
def is_view_op(func: Any) -> bool:
    """Whether the ATen operator ``func`` only makes a view or alias of an input.

    Decided from the operator's schema, as ATen's own view detection does: an
    argument carries an alias annotation (``Tensor(a)``) and none is written
    (``Tensor(a!)``, the in-place and ``out=`` operators, do real work).
    ``view``, ``t``, ``expand``, ``select``, ``detach``, ``as_strided``... are
    views; ``_unsafe_view``, whose schema declares no alias, is counted.
    """
    written = [arg.alias_info.is_write for arg in func._schema.arguments if arg.alias_info is not None]
    return bool(written) and not any(written)


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active, views and aliases apart.

    A dispatch mode sees every operator below autograd: the forward's, the
    backward's (autograd's engine carries the mode to its threads), the
    optimizer's, and the ones custom autograd Functions call; an operator
    that another one calls inside its kernel is not seen (it is one dispatch).
    Each operator that does work is one count under its name (``'mm'``,
    ``'add_'``, ``'_foreach_mul_'``, ``'roi_align'``...); views and aliases
    (:func:`is_view_op`) are counted apart in :attr:`views`, the profiler's
    markers (namespace ``profiler``: ``record_function`` in the optimizer's
    step) in :attr:`markers`.  The count is exact, and independent of the
    input size and the machine's load: the number of host-side dispatches,
    so a stable proxy for the launch overhead of a step.  It may differ
    between device types where a layer takes a device-specific path (OREPA's
    scratch buffers are views of reused memory on the CPU, fresh tensors
    elsewhere); compare counts of one device type.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.views = 0
        self.markers = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func.namespace == 'profiler':
            self.markers += 1
        elif is_view_op(func):
            self.views += 1
        else:
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Operators counted (views, aliases and profiler markers excluded)."""
        return sum(self.by_op.values())


def count_ops(fn: Callable[[], Any]) -> Tuple[OpCounter, Any]:
    """Run ``fn()`` under an :class:`OpCounter`; return (the counter, fn's result)."""
    with OpCounter() as counter:
        out = fn()
    return counter, out


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------
def count_gflop(fn: Callable[[], Any]) -> Tuple[float, Dict[str, float]]:
    """The convolution and matrix-product GFLOP of ``fn()`` (torch's
    ``FlopCounterMode``): the total and by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op).split('.')[1]: n / 1e9 for op, n in counter.get_flop_counts()['Global'].items()}
    return counter.get_total_flops() / 1e9, by_op
