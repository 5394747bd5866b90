"""Checkpoint I/O: weights-only loading under torch >= 2.6, and the one place
where orepa_mm's tools read and write checkpoint files.

Weights-only loading
--------------------
torch >= 2.6 loads with ``weights_only=True`` by default (older torch: see
:func:`load_checkpoint_file` and :mod:`orepa_mm.compat`): its unpickler
rebuilds tensors and plain containers, and refuses every other pickled global
that is not allowlisted.  mmengine 0.10.7 calls ``torch.load`` without the
argument, and its checkpoints hold more than tensors: the message hub's
``HistoryBuffer`` objects, and numpy arrays and scalars of any dtype (a hook or
a metric that logs ``np.float32`` puts one there).  Importing ``orepa_mm``
(:func:`install_safe_globals`) allowlists these data types *by kind*, never
by having seen them in some checkpoint, and never turns ``weights_only`` off.
The entries (:func:`safe_globals`), each with the reason it cannot act:

* **every numpy dtype class** (``numpy.dtypes.*DType``: the class of each
  scalar type in ``np.sctypeDict``, and ``StringDType``).  The unpickler needs
  a dtype's class to restore its state (byte order, field layout, datetime
  unit) with numpy's ``dtype.__setstate__``; a dtype describes memory and
  holds no code.
* **numpy reconstruction**: ``numpy.dtype`` (a dtype from its type string),
  ``numpy._core.multiarray._reconstruct`` (an empty plain ``ndarray``; numpy
  rejects any class that is not an ndarray), ``numpy.ndarray`` (its
  ``__setstate__`` copies raw bytes after checking their size against shape
  and itemsize, and takes objects only as a list that was unpickled under the
  same rules), ``numpy._core.multiarray.scalar`` (a scalar from its dtype and
  raw bytes) and, on numpy 2, ``numpy._core._internal.
  _convert_to_stringdtype_kwargs`` (a ``StringDType`` from its two options).
  The functions are also allowlisted under their numpy 1.x names
  (``numpy.core.multiarray.*``), so checkpoints written with numpy 1 load
  under numpy 2.  They compute values; the worst input makes them allocate
  memory, as torch's own default ``bytearray`` does.
* **bytes**: ``HistoryBuffer`` arrays pickle their empty data as ``bytes()``;
  same constructor as ``bytearray``, which torch allowlists by default.
* **getattr, for HistoryBuffer's statistics methods only**: every
  ``HistoryBuffer`` pickles its method table, whose values pickle as
  ``getattr(HistoryBuffer, 'mean')``.  The pickled name ``builtins.getattr``
  is bound to :func:`_history_buffer_getattr`, which returns only
  ``HistoryBuffer.min/max/current/mean`` (plain functions) and refuses
  anything else.  The real ``getattr`` is NOT allowlisted: with it a pickle
  reaches bound methods (``ndarray.tofile``) and module dictionaries
  (``f.__globals__``, ``f.__builtins__``), and torch's default
  ``_rebuild_from_type_v2`` calls any object it is given, so a weights-only
  checkpoint could write files or rewrite builtins.
* **mmengine's HistoryBuffer**: a plain class (a maximum length and two
  arrays); its ``__setstate__`` stores the state in the instance and merges
  the pickled method table into the class's statistics table, whose values
  can only be what the weights-only unpickler builds: the four methods above,
  data, and allowlisted callables (none of which acts).  Its methods compute
  statistics of the arrays.

Anything else is still refused: a pickled ``os.system``,
``subprocess.Popen``, ``builtins.eval``/``exec``, or any other class (such as
one with a malicious ``__setstate__``).

What the unpickler cannot check: numpy's ``dtype.__setstate__`` trusts the
pickled field layout and flags, so a forged dtype (e.g. a float64 dtype given
an object field) loads, does nothing while loading, and makes numpy read raw
bytes as object pointers once its fields are accessed.  Real checkpoints never
hold one.  :func:`load_checkpoint_file` (the tools), and mmengine's checkpoint
loaders once ``orepa_mm`` is imported (``load_checkpoint``, ``load_from``,
``resume``, ``mim test --checkpoint``), therefore check every numpy value of a
loaded checkpoint against numpy's validating constructor
(:func:`check_numpy_values`) and refuse forged ones.  A bare ``torch.load``
does not run that check.

Checkpoint files
----------------
:func:`load_checkpoint_file`, :func:`extract_state_dict`,
:func:`save_atomic`, :func:`atomic_write` and :func:`atomic_write_text` are
what the tools use to read and write checkpoints and configs.
"""
from __future__ import annotations

import functools
import importlib
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from . import compat

__all__ = ['safe_globals', 'install_safe_globals', 'numpy_dtype_classes', 'HISTORY_BUFFER_STATISTICS',
           'check_numpy_values', 'load_checkpoint_file', 'extract_state_dict', 'save_atomic', 'atomic_write',
           'atomic_write_text', 'CheckpointError']


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message says why."""


# -- the allowlist -------------------------------------------------------------------
#: HistoryBuffer's own statistics methods, the only attributes that the pickled
#: ``getattr`` may return.
HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


def _history_buffer_getattr(obj: Any, name: Any) -> Any:
    """What a pickled ``builtins.getattr`` runs: ``getattr(HistoryBuffer, name)``
    for a statistics method of HistoryBuffer; anything else is refused."""
    history_buffer = _history_buffer()
    if obj is history_buffer and type(name) is str and name in HISTORY_BUFFER_STATISTICS:
        return getattr(history_buffer, name)
    # Name only types: the repr of a forged object is not safe to compute.
    what = obj.__qualname__ if isinstance(obj, type) else f'an object of type {type(obj).__name__}'
    attr = repr(name) if type(name) is str else f'a {type(name).__name__}'
    raise pickle.UnpicklingError(
        f'Unsupported global: getattr({what}, {attr}): the weights-only allowlist of orepa_mm allows getattr only '
        f'for HistoryBuffer.{{{",".join(HISTORY_BUFFER_STATISTICS)}}}')


def numpy_core():
    """numpy's core package with the submodules the allowlist reads imported.

    numpy 2 renamed ``numpy.core`` to ``numpy._core``.  numpy 1.26 also has a
    ``numpy._core`` forward-compatibility shim, which becomes an attribute of
    ``numpy`` as soon as anything imports one of its submodules (mmcv imports
    ``numpy._core._multiarray_umath``), while its ``multiarray`` is not an
    attribute until imported.  So the package is chosen by numpy's major
    version, never by ``hasattr``, and its submodules are imported by name."""
    name = 'numpy._core' if int(np.__version__.split('.')[0]) >= 2 else 'numpy.core'
    for submodule in ('multiarray', '_internal'):
        importlib.import_module(f'{name}.{submodule}')
    return importlib.import_module(name)


def numpy_scalar_types() -> List[type]:
    """numpy's own scalar types among ``np.sctypeDict``'s values.

    Told by the scalar type's module: packages such as ``ml_dtypes`` (imported
    by onnx) register extension types there, and on numpy 1.x the dtype class
    of such a type (``numpy.dtype[bfloat16]``) names numpy as its module."""
    return sorted({t for t in np.sctypeDict.values() if t.__module__.split('.')[0] == 'numpy'},
                  key=lambda t: t.__name__)


def numpy_dtype_classes() -> List[type]:
    """Every numpy dtype class: the class of each scalar type's dtype in
    ``np.sctypeDict``, and every dtype class in ``numpy.dtypes`` (numpy >= 1.25).

    numpy's own only: packages such as ``ml_dtypes`` (imported by onnx)
    register extension dtypes in ``np.sctypeDict``; they are not what
    mmengine checkpoints hold, and the allowlist must not depend on what
    happens to be imported when it is built."""
    classes = {type(np.dtype(t)) for t in numpy_scalar_types()}
    module = getattr(np, 'dtypes', None)
    if module is not None:
        classes |= {c for c in vars(module).values() if isinstance(c, type) and issubclass(c, np.dtype)}
    classes = {c for c in classes if c.__module__.split('.')[0] == 'numpy'}
    return sorted(classes, key=lambda c: f'{c.__module__}.{c.__qualname__}')


def _numpy_reconstructors() -> List[Any]:
    """numpy's pickle reconstruction callables, each under its own name and
    under its numpy 1.x / 2.x spelling."""
    multiarray = numpy_core().multiarray
    entries: List[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        entries.append(fn)
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            if fn.__module__ != module:
                entries.append((fn, f'{module}.{fn.__name__}'))
    internal = getattr(numpy_core(), '_internal', None)
    stringdtype = getattr(internal, '_convert_to_stringdtype_kwargs', None)
    if stringdtype is not None:
        entries.append(stringdtype)
    return entries


def safe_globals() -> List[Any]:
    """The entries that :func:`install_safe_globals` passes to
    ``torch.serialization.add_safe_globals``: objects, or ``(object, name)``
    where a pickled name is bound to a different object.  By kind:

    * every numpy dtype class (:func:`numpy_dtype_classes`): needed to restore
      a dtype's state; a dtype describes memory and holds no code;
    * numpy reconstruction: ``numpy.dtype``, ``numpy.ndarray``,
      ``_reconstruct``, ``scalar`` (also under their numpy 1.x/2.x names) and
      ``_convert_to_stringdtype_kwargs``: they build arrays, scalars and dtypes
      from sizes and raw bytes, checking both;
    * ``bytes``: empty bytes pickle as ``bytes()``; the same constructor as
      ``bytearray``, which torch allowlists itself;
    * ``(_history_buffer_getattr, 'builtins.getattr')``: HistoryBuffer pickles
      its statistics methods as ``getattr(HistoryBuffer, 'mean')``; the bound
      function returns those four plain functions and refuses every other
      lookup (the real getattr would reach bound methods and module globals);
    * mmengine's ``HistoryBuffer``: plain data (a length and two arrays) plus
      a method table that can only hold what the unpickler builds (the four
      methods, data, allowlisted callables).

    The module docstring gives the reasons in full.
    """
    return [*numpy_dtype_classes(), *_numpy_reconstructors(), bytes,
            (_history_buffer_getattr, 'builtins.getattr'), _history_buffer()]


#: What :func:`install_safe_globals` installed (filled on first use).
SAFE_GLOBALS: List[Any] = []


def install_safe_globals() -> None:
    """Allowlist :func:`safe_globals` for ``torch.load(weights_only=True)`` and
    make mmengine's checkpoint loaders check numpy values
    (:func:`check_numpy_values`).  Idempotent: a second call adds nothing and
    wraps no loader twice (it re-adds the same entries if torch's allowlist
    was cleared in between)."""
    if not SAFE_GLOBALS:
        SAFE_GLOBALS.extend(safe_globals())
    compat.add_safe_globals(SAFE_GLOBALS)
    _check_mmengine_loaders()


def _check_mmengine_loaders() -> None:
    """Wrap every loader registered with mmengine's ``CheckpointLoader`` so
    that what it returns goes through :func:`check_numpy_values`."""
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return
    schemes = getattr(CheckpointLoader, '_schemes', None)
    if not isinstance(schemes, dict):
        return
    for prefix, loader in list(schemes.items()):
        if not getattr(loader, '__orepa_mm_checked__', False):
            schemes[prefix] = _checked_loader(loader)


def _checked_loader(loader: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(loader)  # keeps __name__: mmengine logs it ("by local backend")
    def load(filename: str, *args: Any, **kwargs: Any) -> Any:
        checkpoint = loader(filename, *args, **kwargs)
        check_numpy_values(checkpoint, str(filename))
        return checkpoint
    load.__orepa_mm_checked__ = True  # type: ignore[attr-defined]
    return load


# -- numpy values that the unpickler cannot check ---------------------------------------
def _dtype_problem(dtype: np.dtype, depth: int = 0) -> Optional[str]:
    """Why ``dtype`` is not what numpy's validating constructor builds from its
    description (a forged pickled state), or None."""
    if depth > 32:
        return 'nested deeper than 32 levels'
    if not getattr(type(dtype), '_legacy', True):
        return None  # new-style dtypes (StringDType) restore no pickled state
    try:
        names, fields, subarray = dtype.names, dtype.fields, dtype.subdtype
        if names is not None or fields is not None:
            if type(dtype) is not type(np.dtype('V')):
                return f'a {dtype.str} dtype with fields (only structured void dtypes have fields)'
            if not isinstance(names, tuple) or not isinstance(fields, Mapping):
                return 'inconsistent field names and fields'
            for key, entry in fields.items():
                if not (isinstance(entry, tuple) and len(entry) in (2, 3) and isinstance(entry[0], np.dtype)
                        and type(entry[1]) is int):
                    return f'field {key!r} is not (dtype, offset[, title])'
                problem = _dtype_problem(entry[0], depth + 1)
                if problem:
                    return f'field {key!r}: {problem}'
            titled = [fields[n][2] if len(fields[n]) == 3 else None for n in names]
            spec = {'names': list(names), 'formats': [fields[n][0] for n in names],
                    'offsets': [fields[n][1] for n in names], 'itemsize': dtype.itemsize}
            if any(t is not None for t in titled):
                spec['titles'] = titled
            reference = np.dtype(spec, align=dtype.isalignedstruct)
            ref_fields = reference.fields or {}
            if set(ref_fields) != set(fields) or any(ref_fields[k][1:] != fields[k][1:] for k in fields):
                return 'its fields do not match its field names'
        elif subarray is not None:
            if type(dtype) is not type(np.dtype('V')):
                return f'a {dtype.str} dtype with a subarray'
            base, shape = subarray
            problem = _dtype_problem(base, depth + 1)
            if problem:
                return f'subarray: {problem}'
            reference = np.dtype((base, shape))
        else:
            reference = np.dtype(dtype.str)
    except (TypeError, ValueError, KeyError, RecursionError) as e:
        return f'numpy cannot build it ({str(e).splitlines()[0] if str(e) else type(e).__name__})'
    for attr in ('str', 'itemsize', 'alignment', 'flags', 'hasobject'):
        got, expected = getattr(dtype, attr), getattr(reference, attr)
        if got != expected:
            return f'{attr} {got!r} where numpy builds {expected!r}'
    return None


def _children(obj: Any, where: str) -> Iterator[Tuple[Any, str]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield key, f'{where} key'
            yield value, f'{where}[{key!r}]' if isinstance(key, (str, int)) else f'{where}[...]'
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield value, f'{where}[{i}]'
    elif not torch.is_tensor(obj) and isinstance(getattr(obj, '__dict__', None), dict):
        for key, value in vars(obj).items():
            yield value, f'{where}.{key}'


def check_numpy_values(obj: Any, path: str = 'checkpoint') -> None:
    """Raise :class:`CheckpointError` if ``obj`` (a loaded checkpoint) holds a
    numpy dtype, array or scalar whose dtype differs from what numpy's
    validating constructor builds from its description: a forged pickled dtype
    state: numpy reads memory by a dtype's layout (raw bytes would become
    object pointers, offsets would point outside the data).  Reads
    only dtype descriptions, never the data of an unchecked value; tensors are
    not entered."""
    seen: Dict[int, Any] = {}  # values kept alive: their ids stay unique
    stack: List[Tuple[Any, str]] = [(obj, 'checkpoint')]
    while stack:
        value, where = stack.pop()
        if id(value) in seen or torch.is_tensor(value):
            continue
        # numpy first: np.float64, np.str_, np.bytes_ subclass Python's types.
        if isinstance(value, (np.dtype, np.ndarray, np.generic)):
            seen[id(value)] = value
            dtype = value if isinstance(value, np.dtype) else value.dtype
            problem = _dtype_problem(dtype)
            if problem:
                raise CheckpointError(f'refusing to load {path}: {where} has a forged numpy dtype ({problem}); '
                                      'numpy would read memory by that layout')
            if isinstance(value, np.dtype):
                if dtype.metadata:
                    stack.append((dict(dtype.metadata), f'{where}.metadata'))
            elif dtype.hasobject:
                stack.append((value.tolist(), where))
            continue
        if value is None or isinstance(value, (str, bytes, bytearray, bool, int, float, complex)):
            continue
        seen[id(value)] = value
        stack.extend(_children(value, where))


# -- reading -----------------------------------------------------------------------------
def load_checkpoint_file(path: str, map_location: str = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` followed by
    :func:`check_numpy_values`, with one clear single-line
    :class:`CheckpointError` per failure: missing file, corrupt or truncated
    file, a global outside the allowlist, or a forged numpy value.

    On torch >= 2.6 this is torch's own weights-only loader with the
    allowlist above.  On torch 2.1 to 2.5, whose weights-only loader takes no
    such allowlist and cannot restore a ``HistoryBuffer`` or a numpy array, it is
    :class:`orepa_mm.compat.RestrictedUnpickler` with the same allowlist
    (torch's weights-only globals plus :func:`safe_globals`): an mmengine
    training checkpoint loads, and a pickle that names any other global
    (``os.system``, ``eval``, a class of its own) is refused just the same."""
    install_safe_globals()
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        checkpoint = compat.load_weights_only(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        # torch's message: generic advice, then the reason on a line of its own.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # (torch's first line is advice; our own unpickler on an older torch gives one line.)
        reason = next((ln.split('WeightsUnpickler error:')[-1].strip() for ln in (lines[1:] or lines)
                       if re.search(r'global|reduce|can only build|allowlist', ln, re.I)), None)
        if reason:
            raise CheckpointError(f'refusing to load {path}: it contains objects outside the weights-only '
                                  f'allowlist ({reason[:300]})') from None
        raise CheckpointError(f'cannot read checkpoint {path}: the file is corrupt or truncated '
                              '(not a torch checkpoint)') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'cannot read checkpoint {path}: the file is corrupt or truncated '
                              f'({first[:300]})') from None
    check_numpy_values(checkpoint, path)
    return checkpoint


def extract_state_dict(checkpoint: Any, path: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint.

    Accepts a bare state dict or a dict holding one under ``'state_dict'``
    (mmengine, mmcv) or ``'model'`` (torchvision/DeiT-style training
    scripts).  Every key must be a string and every value a tensor (values of
    ``*_extra_state`` keys excepted).  If ALL keys start with ``'module.'``
    (a DataParallel/DDP wrapper) the prefix is removed; the state dict's
    ``_metadata`` (module versions) is kept, with the same prefix removed.
    ``path`` names the checkpoint in error messages.  Raises
    :class:`CheckpointError` with what was found instead.
    """
    name = path or 'the checkpoint'
    state: Any = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in ('state_dict', 'model'):
            if key in checkpoint and not torch.is_tensor(checkpoint[key]):
                state = checkpoint[key]
                if not isinstance(state, Mapping):
                    raise CheckpointError(f'{name}: {key!r} holds a {type(state).__name__}, not a state dict')
                break
    else:
        raise CheckpointError(f'{name} holds no state dict: expected a state dict or a dict with "state_dict" '
                              f'or "model", got a {type(checkpoint).__name__}')
    if not state:
        raise CheckpointError(f'{name} holds an empty state dict')
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f'{name} holds no state dict: key {key!r} is a {type(key).__name__}, not a str')
        if not torch.is_tensor(value) and not key.endswith('_extra_state'):
            keys = ', '.join(map(str, list(state)[:6])) + (', ...' if len(state) > 6 else '')
            raise CheckpointError(f'{name} holds no state dict: {key!r} is a {type(value).__name__}, not a tensor '
                                  f'(expected a state dict or a dict with "state_dict" or "model"; keys: {keys})')
    prefix = 'module.'
    strip = all(k.startswith(prefix) for k in state)
    result: Dict[str, torch.Tensor] = OrderedDict(
        (k[len(prefix):] if strip else k, v) for k, v in state.items())
    metadata = getattr(state, '_metadata', None)
    if isinstance(metadata, Mapping):
        if strip:
            metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else '' if k == 'module' else k, v)
                                   for k, v in metadata.items() if k)
        result._metadata = metadata  # type: ignore[attr-defined]
    return result


# -- writing -----------------------------------------------------------------------------
def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` to write a temporary file in ``path``'s directory
    (created if missing) with ``path``'s extension (writers such as
    ``Config.dump`` choose the format from it), flush it to disk, then rename
    it over ``path``.  ``path`` is either untouched or complete: on any error
    (or interrupt) the temporary file is removed and the error re-raised.  The
    file gets the mode a new file gets, or that of the file it replaces."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{base}.', suffix=os.path.splitext(base)[1] or '.tmp')
    os.close(fd)
    try:
        write(tmp)
        if not os.path.isfile(tmp):
            raise OSError(f'writing {path}: the writer left no file at {tmp}')
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        mode = os.stat(path).st_mode & 0o7777 if os.path.isfile(path) else _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`: never leaves a
    partial file at ``path``; creates its directory."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str, text: str, encoding: str = 'utf-8') -> None:
    """Write ``text`` to ``path`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, 'w', encoding=encoding) as f:
            f.write(text)
    atomic_write(path, write)
