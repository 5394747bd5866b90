"""The torch APIs that are newer than orepa_mm's minimum torch (2.1), each in one place.

The layers, batched generation, fuse and checkpoint code call these instead
of the torch functions, so that one torch range holds for the whole library:

* :func:`is_compiling`: ``torch.compiler.is_compiling`` (torch >= 2.3), else
  ``torch._utils.is_compiling``, which dynamo of torch 2.1/2.2 treats as
  ``True`` while it traces;
* :func:`autocast_enabled` / :func:`autocast_dtype` for a device type:
  ``torch.is_autocast_enabled(device)`` and ``torch.get_autocast_dtype(device)``
  (torch >= 2.4), else the per-device functions of older torch
  (``is_autocast_cpu_enabled``, ``get_autocast_gpu_dtype``, ...);
* :func:`onnx_export`: ``torch.onnx.export`` with the TorchScript exporter
  (``dynamo=False`` where torch has the argument: the default from 2.9 is
  the dynamo exporter, torch before 2.5 has no such argument);
* :func:`add_safe_globals` / :func:`get_safe_globals` /
  :func:`load_weights_only`: weights-only loading with an allowlist
  (torch's own from torch 2.6).

Weights-only loading before torch 2.6
-------------------------------------
torch 2.1 to 2.5 has ``torch.load(weights_only=True)`` (since 1.13) but no
allowlist (2.4 and 2.5: one without the ``(object, name)`` entries that
orepa_mm needs), and torch 2.1's unpickler can only ``BUILD`` tensors,
parameters and ordered dicts, so it refuses every mmengine checkpoint that
carries its message hub (``HistoryBuffer``, numpy arrays).  There torch's default is
``weights_only=False``, so mmengine's own loaders (``load_from``, ``resume``,
``mim test --checkpoint``) read checkpoints as they always did on that torch;
orepa_mm does not change them beyond the numpy check of
:mod:`orepa_mm.checkpoint`.  :func:`load_weights_only` (what orepa_mm's tools
use) instead unpickles with :class:`RestrictedUnpickler`: Python's own
unpickler, given to ``torch.load`` as its ``pickle_module``, that resolves
only the globals of torch's weights-only allowlist plus those registered
with :func:`add_safe_globals`, calls (``REDUCE``, ``NEWOBJ``) only such
globals, and never sets state on a class, module or function.  A pickled
``os.system``, ``eval`` or any other class is refused with
:class:`pickle.UnpicklingError`, as on torch >= 2.6.
"""
from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import contextlib
import inspect
import io
import pickle
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

__all__ = ['TORCH_VERSION', 'HAS_SAFE_GLOBALS', 'is_compiling', 'onnx_export', 'torchscript_onnx_exporter',
           'autocast_enabled', 'autocast_dtype', 'grad_scaler',
           'add_safe_globals', 'get_safe_globals', 'load_weights_only', 'RestrictedUnpickler']


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split('+')[0].split('.')[:2]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


#: ``(major, minor)`` of the running torch.
TORCH_VERSION = _version(torch.__version__)

# -- torch.compile -------------------------------------------------------------------------
#: True while dynamo traces the caller (bound to torch's own function, which
#: dynamo recognises; a wrapper of ours would be traced like any function).
is_compiling: Callable[[], bool] = getattr(getattr(torch, 'compiler', None), 'is_compiling', None) \
    or torch._utils.is_compiling


# -- autocast -----------------------------------------------------------------------------
_NEW_AUTOCAST = hasattr(torch, 'get_autocast_dtype')


_torch_onnx_export: Optional[Callable[..., Any]] = None


def _original_onnx_export() -> Callable[..., Any]:
    """torch's own ``torch.onnx.export`` (looked up on first use: importing
    ``torch.onnx`` costs time that ``import orepa_mm`` should not pay)."""
    global _torch_onnx_export
    if _torch_onnx_export is None:
        import torch.onnx
        _torch_onnx_export = torch.onnx.export
    return _torch_onnx_export


def _torchscript_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if 'dynamo' in inspect.signature(_original_onnx_export()).parameters:
        kwargs.setdefault('dynamo', False)
    return kwargs


def onnx_export(model: torch.nn.Module, args: tuple, path: str, **kwargs: Any) -> None:
    """``torch.onnx.export`` with the TorchScript exporter on every torch.

    From torch 2.9 ``torch.onnx.export`` defaults to the dynamo exporter
    (``dynamo=True``), which traces differently and is not what mmdeploy's
    rewriters or orepa_mm's exports were made for; torch 2.5 to 2.8 take
    ``dynamo=False`` as their default; torch before 2.5 has no ``dynamo``
    argument and only the TorchScript exporter.  This is the one place that
    chooses: :func:`torchscript_onnx_exporter` applies the same choice to code
    that calls ``torch.onnx.export`` itself (mmdeploy)."""
    _original_onnx_export()(model, args, path, **_torchscript_kwargs(kwargs))


def _cast_long(g: Any, value: Any, non_blocking: Any) -> Any:
    """An ONNX ``Cast`` to int64: the symbolic helper ``_cast_Long`` that torch
    2.x's TorchScript exporter had and later releases dropped (mmdeploy 1.3.1's
    RoIAlign symbolic imports it)."""
    return g.op('Cast', value, to_i=7)  # onnx.TensorProto.INT64


@contextlib.contextmanager
def torchscript_onnx_exporter() -> Iterator[None]:
    """Within the block, ``torch.onnx.export`` (as other libraries call it, e.g.
    mmdeploy's ``torch2onnx``) uses the TorchScript exporter, as
    :func:`onnx_export` does, and the symbolic helpers that mmdeploy 1.3.1
    imports exist (:func:`_cast_long`); both are restored afterwards."""
    original = _original_onnx_export()
    import torch.onnx.symbolic_opset9 as opset9
    added_cast = not hasattr(opset9, '_cast_Long')

    def export(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **_torchscript_kwargs(kwargs))

    torch.onnx.export = export
    if added_cast:
        opset9._cast_Long = _cast_long
    try:
        yield
    finally:
        torch.onnx.export = original
        if added_cast:
            del opset9._cast_Long


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cuda'``, ``'cpu'``, ...)."""
    if _NEW_AUTOCAST:
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled()
    if device_type == 'xpu' and hasattr(torch, 'xpu'):
        return torch.xpu.is_autocast_xpu_enabled()
    return False


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast runs ops in on ``device_type``."""
    if _NEW_AUTOCAST:
        return torch.get_autocast_dtype(device_type)
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype()
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype()
    if device_type == 'xpu' and hasattr(torch, 'xpu'):
        return torch.xpu.get_autocast_xpu_dtype()
    raise RuntimeError(f'orepa_mm: autocast on device type {device_type!r} needs torch >= 2.4 '
                       f'(this is torch {torch.__version__})')


def grad_scaler(device_type: str, **kwargs: Any) -> Any:
    """A loss scaler for float16 steps on ``device_type`` (``torch.amp.GradScaler`` since torch 2.3;
    before, only CUDA has one, ``torch.cuda.amp.GradScaler``)."""
    if hasattr(torch.amp, 'GradScaler'):
        return torch.amp.GradScaler(device_type, **kwargs)
    if device_type == 'cuda':
        return torch.cuda.amp.GradScaler(**kwargs)
    raise RuntimeError(f'orepa_mm: a float16 loss scaler on {device_type!r} needs torch >= 2.3 '
                       f'(this is torch {torch.__version__})')


# -- weights-only loading ------------------------------------------------------------------
#: Whether torch's weights-only loader takes our allowlist: torch >= 2.6
#: (2.4 and 2.5 have ``add_safe_globals`` but not its ``(object, name)`` entries).
HAS_SAFE_GLOBALS = TORCH_VERSION >= (2, 6) and hasattr(torch.serialization, 'add_safe_globals')

SafeGlobal = Union[Any, tuple]
#: The entries :func:`add_safe_globals` kept for :class:`RestrictedUnpickler` on an older torch.
_OWN_SAFE_GLOBALS: List[SafeGlobal] = []


def add_safe_globals(entries: List[SafeGlobal]) -> None:
    """Allowlist ``entries`` (objects, or ``(object, pickled name)``) for
    weights-only loading: torch's own allowlist where it has one, else the one
    :class:`RestrictedUnpickler` reads."""
    if HAS_SAFE_GLOBALS:
        torch.serialization.add_safe_globals(entries)
        return
    for entry in entries:
        if not any(entry is e or entry == e for e in _OWN_SAFE_GLOBALS):
            _OWN_SAFE_GLOBALS.append(entry)


def get_safe_globals() -> List[SafeGlobal]:
    """The allowlist that :func:`add_safe_globals` added to."""
    if HAS_SAFE_GLOBALS:
        return list(torch.serialization.get_safe_globals())
    return list(_OWN_SAFE_GLOBALS)


def clear_safe_globals() -> None:
    """Empty that allowlist (tests restore it afterwards)."""
    if HAS_SAFE_GLOBALS:
        torch.serialization.clear_safe_globals()
    else:
        _OWN_SAFE_GLOBALS.clear()


def _pickled_name(obj: Any) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


#: Plain-data constructors that torch >= 2.6 allowlists itself and torch 2.1
#: does not: protocol-2 pickles (``torch.save``'s) spell bytes as
#: ``_codecs.encode(text, 'latin1')``.
_DATA_CONSTRUCTORS = {'_codecs.encode': _codecs.encode, 'builtins.bytearray': bytearray, 'builtins.complex': complex,
                      'builtins.set': set, 'collections.Counter': collections.Counter,
                      'collections.OrderedDict': collections.OrderedDict}


def _allowed_globals() -> Dict[str, Any]:
    """Pickled name -> object: torch's weights-only allowlist and ours."""
    from torch import _weights_only_unpickler
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update(_DATA_CONSTRUCTORS)
    for entry in _OWN_SAFE_GLOBALS:
        obj, name = entry if isinstance(entry, tuple) else (entry, _pickled_name(entry))
        allowed[name] = obj
    return allowed


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's unpickler restricted to an allowlist (see the module docstring).

    ``torch.load`` subclasses it (to resolve storages and restore tensors
    through ``persistent_load``), so every other global goes through
    :meth:`find_class`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()
        self._allowed_ids = {id(obj) for obj in self._allowed.values()}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as the base class maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f'{module}.{name}'
        if full in self._allowed:
            return self._allowed[full]
        raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {full} is not in the weights-only allowlist')

    def load(self) -> Any:
        try:
            return super().load()
        except KeyError as e:  # Python's unpickler: an unknown opcode or memo entry
            raise pickle.UnpicklingError(f'invalid pickle data (unknown opcode or memo key {e})') from None

    def _check_callable(self, func: Any, opcode: str) -> None:
        if id(func) not in self._allowed_ids:
            raise pickle.UnpicklingError(f'Unsupported {opcode}: {type(func).__name__} is not an allowlisted global')

    def load_reduce(self) -> None:
        self._check_callable(self.stack[-2], 'reduce')
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_callable(self.stack[-2], 'reduce (NEWOBJ)')
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_callable(self.stack[-3], 'reduce (NEWOBJ_EX)')
        super().load_newobj_ex()

    def load_obj(self) -> None:
        raise pickle.UnpicklingError('Unsupported reduce (OBJ): protocol-0/1 object construction')

    def load_build(self) -> None:
        inst = self.stack[-2]
        if isinstance(inst, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                             types.MethodType)):
            raise pickle.UnpicklingError(f'Unsupported build: setting state on a {type(inst).__name__}')
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: What ``torch.load`` takes as ``pickle_module`` on a torch without an allowlist.
_RESTRICTED_PICKLE = types.ModuleType('orepa_mm_restricted_pickle')
_RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.loads = lambda data, **kw: _restricted_load(io.BytesIO(data), **kw)  # type: ignore[attr-defined]


def load_weights_only(path: str, map_location: Optional[Any] = None) -> Any:
    """``torch.load(path, weights_only=True)`` with the allowlist of
    :func:`add_safe_globals`; on a torch without one, the same allowlist
    through :class:`RestrictedUnpickler`.  A global outside it raises
    :class:`pickle.UnpicklingError` either way."""
    if HAS_SAFE_GLOBALS:
        return torch.load(path, map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, pickle_module=_RESTRICTED_PICKLE, weights_only=False)
