"""Captured generation: a group's kernel generation and ``kernel_backward``
recorded once and replayed, so that a step launches a handful of operators per
group instead of a few dozen (:mod:`.batched_generation` decides when).

Why: on a GPU, the generation's operators are tiny and the host launching
them is the bottleneck of an OREPA training step, not the arithmetic.  A
CUDA graph replays all of a group's operators with one launch.  Packing
already gives the parameters fixed storage across optimizer steps; the graph
reads them in place.

What a recording is: :class:`CapturedGeneration` holds, per group packing,

* the generation: the virtual generator's ``generate()``, whose output (the
  group's kernels) lives in a fixed buffer that every replay overwrites;
* the backward: ``kernel_backward(grad)`` with ``grad`` copied into a fixed
  input buffer; its outputs are fixed buffers too, so they are cloned
  before autograd sees them (autograd may keep a gradient tensor as
  ``.grad``, and the next replay would overwrite it).

On CUDA it records on its second use (the first runs eagerly: groups form
during the first steps, and CUDA wants a warm-up before capture); it is
dropped whenever the group packs again.  The caller must not replay while kernels of
an earlier replay may still be needed (see ``_Group.capture_for``).

Backends (:func:`set_generation_capture`):

* ``'cuda'``: ``torch.cuda.CUDAGraph``, for groups on CUDA devices;
* ``'simulate'``: the same fixed-buffer semantics computed eagerly (each
  replay runs the operators and copies into the fixed buffers), on any
  device.  It exists for tests: it exercises exactly the buffer reuse that
  a CUDA graph has, on a machine without one.

Default: off (``OREPA_MM_CAPTURE=cuda`` in the environment turns it on).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ['set_generation_capture', 'generation_capture', 'CapturedGeneration', 'CAPTURE_MODES']

#: The capture modes: off, CUDA graphs for CUDA groups, or the eager simulation of fixed buffers.
CAPTURE_MODES = ('off', 'cuda', 'simulate')
_MODE = os.environ.get('OREPA_MM_CAPTURE', 'off') or 'off'
if _MODE not in CAPTURE_MODES:
    raise ValueError(f'OREPA_MM_CAPTURE={_MODE!r}: choose one of {CAPTURE_MODES}')


def set_generation_capture(mode: str) -> None:
    """Replay batched kernel generation from recordings: ``'cuda'`` (CUDA
    graphs, for layers on CUDA; layers elsewhere stay eager), ``'simulate'``
    (fixed buffers computed eagerly, any device: for tests) or ``'off'``."""
    global _MODE
    if mode not in CAPTURE_MODES:
        raise ValueError(f'generation capture mode {mode!r}: choose one of {CAPTURE_MODES}')
    _MODE = mode


def generation_capture(device: torch.device) -> Optional[str]:
    """The backend for a group on ``device``, or None (eager)."""
    if _MODE == 'simulate':
        return 'simulate'
    if _MODE == 'cuda' and device.type == 'cuda':
        return 'cuda'
    return None


class _Recording:
    """``fn()``'s outputs (a tensor or a dict of tensors) in fixed buffers,
    refreshed by :meth:`replay`.  A CUDA graph keeps the addresses it was
    recorded with; the simulation runs the ``fn`` it is given (the same
    computation on the same storage) and copies into the buffers."""

    def __init__(self, fn: Callable[[], object], backend: str) -> None:
        self.backend = backend
        if backend == 'cuda':
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (cuBLAS workspaces, lazy init)
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn()
            self.graph.replay()  # capture records without running: this computes the outputs
        else:
            out = fn()
            self.outputs = {k: v.clone() for k, v in out.items()} if isinstance(out, dict) else out.clone()

    def replay(self, fn: Callable[[], object]) -> object:
        if self.backend == 'cuda':
            self.graph.replay()
        else:
            out = fn()
            if isinstance(out, dict):
                for k, v in out.items():
                    self.outputs[k].copy_(v)
            else:
                self.outputs.copy_(out)
        return self.outputs


class CapturedGeneration:
    """A group's generation and gradient, recorded for one packing of its
    parameters.  Each call takes that step's virtual generator (a new
    object over the same packed storage); none is kept, so a recording does
    not keep a dropped model's parameters alive."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        # CUDA records on the second use (a warm-up first); the simulation at once, so that tests replay.
        self.record_at = 2 if backend == 'cuda' else 1
        self.uses = 0
        self.generation: Optional[_Recording] = None
        self.backward: Optional[_Recording] = None
        self.grad_in: Optional[Tensor] = None

    def generate(self, virtual: torch.nn.Module) -> Tensor:
        """The group's kernels, in the recording's fixed buffer once recorded
        (overwritten by the next replay)."""
        self.uses += 1
        if self.generation is None:
            if self.uses < self.record_at:
                return virtual.generate()
            self.generation = _Recording(virtual.generate, self.backend)
            return self.generation.outputs  # type: ignore[return-value]
        return self.generation.replay(virtual.generate)  # type: ignore[return-value]

    def kernel_backward(self, virtual: torch.nn.Module, grad: Tensor) -> Dict[str, Tensor]:
        """``virtual.kernel_backward(grad)``, replayed once recorded; fresh tensors either way."""
        if self.generation is None:  # not recorded yet: this step ran eagerly
            return virtual.kernel_backward(grad)
        if self.grad_in is None:
            self.grad_in = torch.empty_like(grad, memory_format=torch.contiguous_format)
        self.grad_in.copy_(grad)
        grad_in = self.grad_in
        if self.backward is None:
            self.backward = _Recording(lambda: virtual.kernel_backward(grad_in), self.backend)
            outputs = self.backward.outputs
        else:
            outputs = self.backward.replay(lambda: virtual.kernel_backward(grad_in))
        return {name: g.clone() for name, g in outputs.items()}  # type: ignore[union-attr]
