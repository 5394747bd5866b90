"""Checkpoints that must not load: pickles that act when unpickled (os.system,
subprocess.Popen, eval, exec, a class with a malicious ``__setstate__``,
getattr chains) are refused by every loader with no side effect, and forged
numpy dtypes (which torch's weights-only unpickler builds) are refused after
loading, before their memory is read.  Each payload is first shown to act
under an unrestricted unpickler, so that the refusal tests prove something."""
from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Tuple

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from checkpoint_loaders import LOADERS, load_mmengine, load_orepa, load_torch, save_with_meta
from orepa_mm import checkpoint as ckpt_io
from orepa_mm.checkpoint import CheckpointError, numpy_core

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


# -- hostile pickles ------------------------------------------------------------------------
class _Reduce:
    """Pickles as ``fn(*args)`` (with optional dict items set on the result)."""

    def __init__(self, fn: Any, args: tuple, dict_items: list = ()) -> None:
        self.fn, self.args, self.dict_items = fn, args, list(dict_items)

    def __reduce__(self):
        return (self.fn, self.args, None, None, iter(self.dict_items) if self.dict_items else None)


class _EvilSetstate:
    """Arbitrary class whose ``__setstate__`` acts."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state['marker']).touch()


_PWNED_KEY = '__orepa_mm_test_pwned__'


def _hostile(kind: str, marker: Path) -> Tuple[Any, str, Callable[[], bool]]:
    """(payload, what the refusal must name, did-it-act check) for ``kind``."""
    touched = marker.exists
    m = str(marker)
    if kind == 'os.system':
        return _Reduce(os.system, (f'touch {m}',)), 'system', touched
    if kind == 'subprocess.Popen':
        return _Reduce(subprocess.Popen, (['touch', m],)), 'Popen', touched
    if kind == 'builtins.eval':
        return _Reduce(builtins.eval, (f"open({m!r}, 'w').close()",)), 'eval', touched
    if kind == 'builtins.exec':
        return _Reduce(builtins.exec, (f"open({m!r}, 'w').close()",)), 'exec', touched
    if kind == 'malicious __setstate__':
        return _EvilSetstate(m), '_EvilSetstate', touched
    if kind == 'getattr ndarray.tofile':
        # torch's default _rebuild_from_type_v2 calls whatever it is given: with
        # the real getattr that writes any file with any content.
        data = np.frombuffer(b'import os\n', dtype=np.uint8).copy()
        payload = _Reduce(torch._tensor._rebuild_from_type_v2,
                          (_Reduce(getattr, (data, 'tofile')), torch.Tensor, (m,), None))
        return payload, 'getattr', touched
    if kind == 'getattr __globals__':
        module = sys.modules[HistoryBuffer.__module__]
        return (_Reduce(getattr, (HistoryBuffer.mean, '__globals__'), [(_PWNED_KEY, m)]), 'getattr',
                lambda: hasattr(module, _PWNED_KEY))
    if kind == 'getattr __builtins__':
        return (_Reduce(getattr, (HistoryBuffer.mean, '__builtins__'), [(_PWNED_KEY, m)]), 'getattr',
                lambda: hasattr(builtins, _PWNED_KEY))
    raise AssertionError(kind)


HOSTILE = ['os.system', 'subprocess.Popen', 'builtins.eval', 'builtins.exec', 'malicious __setstate__',
           'getattr ndarray.tofile', 'getattr __globals__']
if sys.version_info >= (3, 10):  # functions have a __builtins__ attribute from Python 3.10
    HOSTILE.append('getattr __builtins__')


def _undo(marker: Path) -> None:
    marker.unlink(missing_ok=True)
    for namespace in (sys.modules[HistoryBuffer.__module__].__dict__, builtins.__dict__):
        namespace.pop(_PWNED_KEY, None)


@pytest.mark.parametrize('kind', HOSTILE)
def test_hostile_payload_acts_when_unpickled_unsafely(tmp_path, kind):
    """The payloads are live: a plain unpickler (weights_only=False) runs them."""
    marker = tmp_path / 'pwned'
    payload, _, acted = _hostile(kind, marker)
    path = save_with_meta(payload, tmp_path / 'evil.pth')
    try:
        try:
            torch.load(path, weights_only=False)
        except Exception:
            pass  # some payloads act, then fail to build the rest
        deadline = time.monotonic() + 10  # Popen runs in the background
        while not acted() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert acted(), f'{kind}: the payload did not act, so the refusal test proves nothing'
    finally:
        _undo(marker)


@pytest.mark.parametrize('loader', list(LOADERS))
@pytest.mark.parametrize('kind', HOSTILE)
def test_hostile_payload_is_refused_without_side_effect(tmp_path, kind, loader):
    marker = tmp_path / 'pwned'
    payload, named, acted = _hostile(kind, marker)
    path = save_with_meta(payload, tmp_path / 'evil.pth')
    try:
        expected = CheckpointError if loader == 'load_checkpoint_file' else pickle.UnpicklingError
        with pytest.raises(expected) as info:
            LOADERS[loader](path)
        if loader == 'load_checkpoint_file':
            message = str(info.value)
            assert '\n' not in message and 'allowlist' in message and named in message, message
        if kind == 'subprocess.Popen':
            time.sleep(0.5)  # what Popen would have started in the background
        assert not acted(), f'{kind} acted while being refused'
    finally:
        _undo(marker)


# -- forged numpy dtypes (loadable by torch, refused after loading) ----------------------------
class _Dtype:
    """Pickles as ``np.dtype(spec, False, True)`` with a hand-written state (none: no BUILD)."""

    def __init__(self, spec: str, state: Any = None) -> None:
        self.spec, self.state = spec, state

    def __reduce__(self):
        if self.state is None:
            return (np.dtype, (self.spec, False, True))
        return (np.dtype, (self.spec, False, True), self.state)


class _Array:
    """Pickles as an ndarray of ``dtype`` holding ``data`` (raw bytes)."""

    def __init__(self, dtype: Any, data: bytes, n: int = 1) -> None:
        self.dtype, self.data, self.n = dtype, data, n

    def __reduce__(self):
        core = numpy_core()
        return (core.multiarray._reconstruct, (np.ndarray, (0,), b'b'), (1, (self.n,), self.dtype, False, self.data))


_OBJ = _Dtype('O8')  # an object dtype, built without state
FORGED = {
    # a float64 dtype given an object field: arr['a'] reads 0x4141... as a PyObject pointer
    'float64 with object field': _Array(_Dtype('f8', (3, '<', None, ('a',), {'a': (_OBJ, 0)}, -1, -1, 0)),
                                        b'A' * 8),
    'bare forged dtype': _Dtype('f8', (3, '<', None, ('a',), {'a': (_OBJ, 0)}, -1, -1, 0)),
    'struct with overlapping object field': _Array(
        _Dtype('V8', (3, '|', None, ('a', 'b'), {'a': (_OBJ, 0), 'b': (np.dtype('f8'), 0)}, 8, 1, 0)), b'A' * 8),
    'struct with object field, flags cleared': _Array(
        _Dtype('V16', (3, '|', None, ('a', 'b'), {'a': (np.dtype('f8'), 0), 'b': (_OBJ, 8)}, 16, 1, 0)), b'A' * 16),
    'field outside the item': _Array(
        _Dtype('V4', (3, '|', None, ('a',), {'a': (np.dtype('f8'), 1000)}, 4, 1, 0)), b'A' * 4),
    'field not in names': _Array(
        _Dtype('V8', (3, '|', None, ('a',), {'a': (np.dtype('f8'), 0), 'evil': (_OBJ, 0)}, 8, 1, 0)), b'A' * 8),
    'float64 with subarray': _Dtype('f8', (3, '<', (_OBJ, (4,)), None, None, -1, -1, 0)),
    'str itemsize not a multiple of 4': _Array(_Dtype('U1', (3, '<', None, None, None, 3, 4, 0)), b'A' * 3),
}


#: The loaders that check numpy values: on every torch (mmengine's unpickles
#: fully before torch 2.6, and orepa_mm checks what it returns all the same).
NUMPY_CHECKED = {'mmengine.load_checkpoint': load_mmengine, 'load_checkpoint_file': load_orepa}


@pytest.mark.parametrize('loader', list(NUMPY_CHECKED))
@pytest.mark.parametrize('kind', list(FORGED))
def test_forged_numpy_dtype_is_refused(tmp_path, kind, loader):
    path = save_with_meta(FORGED[kind], tmp_path / 'forged.pth')
    with pytest.raises(CheckpointError, match='forged numpy dtype') as info:
        NUMPY_CHECKED[loader](path)
    assert '\n' not in str(info.value) and "checkpoint['meta']['v']" in str(info.value), str(info.value)


def test_forged_dtype_check_reads_no_data(tmp_path):
    """The check refuses a forged array before touching its memory; a real
    array of the same layout passes."""
    good = np.array([(1.0, 'x')], dtype=[('a', 'f8'), ('b', 'O')])
    ckpt_io.check_numpy_values({'v': good})
    with pytest.raises(CheckpointError, match=r"checkpoint\['v'\].*flags"):
        ckpt_io.check_numpy_values({'v': load_torch(save_with_meta(FORGED['struct with object field, flags cleared'],
                                                           tmp_path / 'f.pth'))['meta']['v']})
