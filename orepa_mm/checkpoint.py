"""Loading checkpoints with ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default and refuses any
pickled global that is not allowlisted.  mmengine 0.10.7 calls ``torch.load``
without the argument, and its checkpoints carry a few harmless globals (the
message hub's ``HistoryBuffer`` and the numpy arrays and scalars inside it),
so ``mim test``, ``resume`` and ``load_from`` fail.  Importing ``orepa_mm``
allowlists exactly those globals (:data:`SAFE_GLOBALS`) instead of turning
``weights_only`` off: any other global, e.g. a pickled ``os.system`` call,
is still refused.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, List

import numpy as np
import torch

__all__ = ['safe_globals', 'install_safe_globals', 'load_checkpoint_file', 'CheckpointError']


def safe_globals() -> List[Any]:
    """The globals that mmengine/mmdet/mmseg training checkpoints hold beyond
    torch's defaults, found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real ones
    (``tests/test_checkpoint_safety.py`` re-checks it on fresh checkpoints):

    * ``HistoryBuffer``, the message hub's logged scalars, and the numpy
      arrays and scalars in it (``_reconstruct``, ``ndarray``, ``dtype``,
      ``scalar``, and the float64/int64 dtype classes their state restores);
    * ``builtins.getattr``: each ``HistoryBuffer`` stores its statistics
      methods, which pickle as ``getattr(HistoryBuffer, 'mean')``.  The
      weights-only unpickler calls only allowlisted callables, so getattr can
      look attributes up but nothing it returns can be called while loading.
    """
    import builtins

    from mmengine.logging.history_buffer import HistoryBuffer
    core = np._core if hasattr(np, '_core') else np.core  # numpy 2 renamed np.core
    return [HistoryBuffer, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            type(np.dtype('float64')), type(np.dtype('int64')), builtins.getattr]


SAFE_GLOBALS: List[Any] = []


def install_safe_globals() -> None:
    """Allowlist :func:`safe_globals` for ``torch.load(weights_only=True)``."""
    if not SAFE_GLOBALS:
        SAFE_GLOBALS.extend(safe_globals())
    torch.serialization.add_safe_globals(SAFE_GLOBALS)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message says why."""


def load_checkpoint_file(path: str, map_location: str = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per failure:
    missing file, corrupt or truncated file, or a disallowed global."""
    install_safe_globals()
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: generic advice, then the reason on a line of its own.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln.split('WeightsUnpickler error:')[-1].strip() for ln in lines[1:]
                       if re.search(r'global|reduce|can only build|allowlist', ln, re.I)), None)
        if reason:
            raise CheckpointError(f'refusing to load {path}: it contains objects outside the weights-only '
                                  f'allowlist ({reason[:200]})') from None
        raise CheckpointError(f'cannot read checkpoint {path}: the file is corrupt or truncated '
                              '(not a torch checkpoint)') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f'cannot read checkpoint {path}: the file is corrupt or truncated '
                              f'({str(e).splitlines()[0]})') from None
