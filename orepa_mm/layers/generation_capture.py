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
  group's kernels) lives in a fixed buffer that every replay overwrites; what
  it replays reads nothing but the packed parameters' storage (a copy made
  outside it would be replayed at the value it had when recorded);
* the backward: ``kernel_backward(grad)`` with ``grad`` copied into a fixed
  input buffer; its outputs are fixed buffers too, so they are cloned
  before autograd sees them (autograd may keep a gradient tensor as
  ``.grad``, and the next replay would overwrite it).

On CUDA it records on its second use (the first runs eagerly: groups form
during the first steps, and CUDA wants a warm-up before capture).  It holds
the packed parameters' storage that it reads, so the group can copy values
back into it when something points the parameters elsewhere (FSDP does at
every forward); the group drops it when it packs new members or storage, or
when a member dies.  The caller must not replay while kernels of an earlier
replay may still be needed (see ``_Group.capture_for``).

Backends (:func:`set_generation_capture`):

* ``'cuda'``: ``torch.cuda.CUDAGraph``, for groups on CUDA devices;
* ``'simulate'``: the same fixed-buffer semantics computed eagerly, on any
  device: each replay runs the recorded computation again, on the storage
  it was recorded with, and copies into the fixed buffers.  It exists for
  tests: it exercises exactly the buffer reuse, and the reads of recorded
  storage, that a CUDA graph has, on a machine without one.

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
    refreshed by :meth:`replay`.  A CUDA graph replays the addresses it was
    recorded with; the simulation runs ``fn`` again and copies into the
    buffers.  Both keep ``fn``, and so every tensor it reads or writes
    outside the graph's own pool alive: a freed one's memory would be
    reused, and a replay would read or overwrite someone else's data."""

    def __init__(self, fn: Callable[[], object], backend: str) -> None:
        self.backend = backend
        self.fn = fn
        if backend == 'cuda':
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (cuBLAS workspaces, lazy init)
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # Thread-local: what is captured is this thread's own generation.
            # Other threads (a pin-memory thread allocating, NCCL's watchdog
            # querying events) may go on: in the default global mode their
            # calls would fail while a layer records mid-step.
            with torch.cuda.graph(self.graph, capture_error_mode='thread_local'):
                self.outputs = fn()
            self.graph.replay()  # capture records without running: this computes the outputs
        else:
            out = fn()
            self.outputs = {k: v.clone() for k, v in out.items()} if isinstance(out, dict) else out.clone()

    def replay(self) -> object:
        if self.backend == 'cuda':
            self.graph.replay()
        else:
            out = self.fn()
            if isinstance(out, dict):
                for k, v in out.items():
                    self.outputs[k].copy_(v)
            else:
                self.outputs.copy_(out)
        return self.outputs


class CapturedGeneration:
    """A group's generation and gradient, recorded for one packing of its
    parameters.  Each call takes that step's virtual generator (a new
    object over the same packed storage); the recordings read the storage
    of the virtual generator they were recorded with, ``storage``: the
    packed ``(n, *shape)`` tensor per parameter name, kept alive here."""

    def __init__(self, backend: str, storage: Dict[str, Tensor]) -> None:
        self.backend = backend
        self.storage = storage
        # CUDA records on the second use (a warm-up first); the simulation at once, so that tests replay.
        self.record_at = 2 if backend == 'cuda' else 1
        self.uses = 0
        self.generation: Optional[_Recording] = None
        self.backward: Optional[_Recording] = None
        self.grad_in: Optional[Tensor] = None

    def generate(self, generate: Callable[[], Tensor]) -> Tensor:
        """``generate()``: the group's kernels, in the recording's fixed buffer
        once recorded (overwritten by the next replay).  ``generate`` reads
        the packed storage only: a replay runs the recorded one."""
        self.uses += 1
        if self.generation is None:
            if self.uses < self.record_at:
                return generate()
            self.generation = _Recording(generate, self.backend)
            return self.generation.outputs  # type: ignore[return-value]
        return self.generation.replay()  # type: ignore[return-value]

    def kernel_backward(self, kernel_backward: Callable[[Tensor], Dict[str, Tensor]],
                        grad: Tensor) -> Dict[str, Tensor]:
        """``kernel_backward(grad)``, replayed once recorded; fresh tensors either way."""
        if self.generation is None:  # not recorded yet: this step ran eagerly
            return kernel_backward(grad)
        if self.grad_in is None:
            self.grad_in = torch.empty_like(grad, memory_format=torch.contiguous_format)
        self.grad_in.copy_(grad)
        grad_in = self.grad_in
        if self.backward is None:
            self.backward = _Recording(lambda: kernel_backward(grad_in), self.backend)
            outputs = self.backward.outputs
        else:
            outputs = self.backward.replay()
        return {name: g.clone() for name, g in outputs.items()}  # type: ignore[union-attr]
