"""Weights-only loading of mmengine checkpoints under torch >= 2.6.

Importing orepa_mm allowlists inert data types by kind (every numpy dtype,
numpy reconstruction, bytes, HistoryBuffer and its statistics methods); every
value of those kinds loads through ``torch.load(weights_only=True)``,
mmengine's ``load_checkpoint`` and ``load_checkpoint_file``, and real
checkpoints of a run that logs float32 values go through ``mim test`` and
``--resume``.  What must not load (hostile pickles, forged numpy dtypes) is
tested in ``test_checkpoint_hostile.py``.
"""
from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import pickletools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

import orepa_mm  # noqa: F401  (installs the allowlist)
from checkpoint_loaders import LOADERS, save_with_meta
from conftest import SEG_CFG, bin_path, run
from orepa_mm import checkpoint as ckpt_io
from orepa_mm import compat
from orepa_mm.checkpoint import load_checkpoint_file, numpy_core, safe_globals

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


def _name(obj: Any) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


def _entry_names() -> Dict[str, Any]:
    """Pickled name -> allowlisted object, as torch resolves them."""
    names = {}
    for entry in safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, _name(entry))
        names[name] = obj
    return names


# -- the allowlist is made of inert kinds --------------------------------------------
def test_allowlist_entries_are_inert_data_kinds():
    core = numpy_core()
    reconstruction = {core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray}
    stringdtype = getattr(getattr(core, '_internal', None), '_convert_to_stringdtype_kwargs', None)
    if stringdtype is not None:
        reconstruction.add(stringdtype)
    kinds: Dict[str, List[str]] = {}
    for name, obj in _entry_names().items():
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            kind = 'numpy dtype class'
        elif obj in reconstruction:
            kind = 'numpy reconstruction'
            assert name.rsplit('.', 1)[-1] == obj.__name__ and name.split('.')[0] == 'numpy', name
        elif obj is bytes:
            kind = 'bytes'
        elif obj is ckpt_io._history_buffer_getattr and name == 'builtins.getattr':
            kind = 'restricted getattr'
        elif obj is HistoryBuffer:
            kind = 'HistoryBuffer'
        else:
            raise AssertionError(f'allowlisted {name} -> {obj!r} is none of the inert kinds')
        kinds.setdefault(kind, []).append(name)
    assert set(kinds) == {'numpy dtype class', 'numpy reconstruction', 'bytes', 'restricted getattr',
                          'HistoryBuffer'}, kinds
    # By kind, not by sighting: every numpy scalar type's dtype class is there
    # (numpy's own: ml_dtypes, imported by onnx, adds extension dtypes to np.sctypeDict).
    allowed = set(_entry_names().values())
    numpy_own = {type(np.dtype(t)) for t in set(np.sctypeDict.values()) if t.__module__.split('.')[0] == 'numpy'}
    missing = numpy_own - allowed
    assert not missing, f'numpy dtype classes missing from the allowlist: {sorted(map(str, missing))}'
    # The real getattr is never allowlisted: its pickled name is bound to the restricted one.
    assert builtins.getattr not in allowed
    assert _entry_names()['builtins.getattr'] is ckpt_io._history_buffer_getattr


def test_restricted_getattr_returns_only_statistics_methods():
    for name in ckpt_io.HISTORY_BUFFER_STATISTICS:
        assert ckpt_io._history_buffer_getattr(HistoryBuffer, name) is getattr(HistoryBuffer, name)
    for obj, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, 'register_statistics'),
                      (HistoryBuffer, '__dict__'), (HistoryBuffer(), 'mean'), (HistoryBuffer.mean, '__globals__'),
                      (np.zeros(1), 'tofile'), (os, 'system'), (HistoryBuffer, np.str_('min_'))]:
        with pytest.raises(pickle.UnpicklingError, match='getattr only for HistoryBuffer'):
            ckpt_io._history_buffer_getattr(obj, name)


def test_install_is_idempotent():
    before = set(compat.get_safe_globals())
    loaders = dict(CheckpointLoader._schemes)
    ckpt_io.install_safe_globals()
    ckpt_io.install_safe_globals()
    assert set(compat.get_safe_globals()) == before
    assert dict(CheckpointLoader._schemes) == loaders
    local = CheckpointLoader._schemes['']
    assert local.__orepa_mm_checked__ and not getattr(local.__wrapped__, '__orepa_mm_checked__', False)
    assert local.__name__ == 'load_from_local'  # mmengine logs "Loads checkpoint by local backend"


def test_allowlist_builds_after_numpy_core_shim_was_imported():
    """numpy 1.26 ships a ``numpy._core`` shim: once something imports one of its
    submodules (mmcv imports ``numpy._core._multiarray_umath``), ``np._core`` is an
    attribute but ``np._core.multiarray`` is not.  Building the allowlist must not
    depend on that (it raised AttributeError at ``import orepa_mm``).  In a fresh
    interpreter, so that nothing else has imported numpy's submodules yet."""
    if importlib.util.find_spec('numpy._core') is None:
        pytest.skip(f'numpy {np.__version__} has no numpy._core (the shim came with numpy 1.25)')
    code = ('import numpy._core._multiarray_umath\n'
            'from orepa_mm.checkpoint import safe_globals\n'
            'print(len(safe_globals()))\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == len(safe_globals())


# -- every numpy dtype, as scalar and as array ---------------------------------------------
def _numpy_array(scalar_type: type) -> np.ndarray:
    """A small array of ``scalar_type`` with distinct, non-zero values."""
    kind = np.dtype(scalar_type).kind
    if kind == 'b':
        return np.array([True, False, True], dtype=scalar_type)
    if kind in 'iu':
        return np.array([1, 7, 100], dtype=scalar_type)
    if kind == 'f':
        return np.array([0.5, -1.25, 3.0], dtype=scalar_type)
    if kind == 'c':
        return np.array([1 + 2j, -0.5j, 3], dtype=scalar_type)
    if kind == 'M':
        return np.array(['2024-01-02T03:04:05', '1999-12-31T23:59:59', 'NaT'], dtype='datetime64[s]')
    if kind == 'm':
        return np.array([5, -3, 0], dtype='timedelta64[ms]')
    if kind == 'U':
        return np.array(['a', 'bcd', 'é'], dtype=scalar_type)
    if kind == 'S':
        return np.array([b'a', b'bcd', b'\x00\xff'], dtype=scalar_type)
    if kind == 'V':
        return np.array([b'\x01\x02\x03', b'abc', b'\xff\x00\x01'], dtype='V3')
    if kind == 'O':
        return np.array([1, 'two', (3.0, None)], dtype=object)
    raise AssertionError(f'no sample for numpy kind {kind!r} ({scalar_type})')


#: numpy's own (extension types that ml_dtypes registers, depending on import order, are not).
SCALAR_TYPES = ckpt_io.numpy_scalar_types()


def _numpy_cases() -> List[Tuple[str, Any]]:
    cases = []
    for t in SCALAR_TYPES:
        arr = _numpy_array(t)
        cases.append((f'{t.__name__}-scalar', arr[1]))
        cases.append((f'{t.__name__}-array', arr))
    big_endian = np.dtype('>f4')
    cases += [
        ('float32-big-endian-array', np.arange(4, dtype=big_endian)),
        ('int64-big-endian-scalar', np.arange(3, dtype='>i8')[2]),
        ('float32-fortran-2d-array', np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
        ('structured-array', np.array([(1.5, 2, b'x'), (-1.0, 3, b'yz')], dtype=[('a', '<f4'), ('b', '>i8'),
                                                                                  ('c', 'S2')])),
        ('structured-aligned-array', np.zeros(2, dtype=np.dtype([('a', 'i1'), ('b', 'f8')], align=True))),
        ('structured-subarray-field-array', np.ones(2, dtype=[('a', 'f4', (2, 3)), ('b', 'u1')])),
        ('structured-object-field-array', np.array([(1.0, 'x'), (2.0, None)], dtype=[('a', 'f4'), ('b', 'O')])),
        ('structured-titles-array', np.zeros(1, dtype={'names': ['a'], 'formats': ['f4'], 'titles': ['T']})),
        ('structured-scalar', np.array([(1.5, 2)], dtype=[('a', 'f4'), ('b', 'i2')])[0]),
        ('datetime64-days-scalar', np.datetime64('2024-02-29', 'D')),
        ('float32-0d-array', np.array(np.float32(2.5))),
        ('float32-empty-array', np.zeros((0, 3), dtype=np.float32)),
        ('dtype-float32', np.dtype('float32')),
        ('dtype-subarray', np.dtype(('f4', (2, 3)))),
        ('dtype-metadata', np.dtype('f8', metadata={'unit': 'm'})),
    ]
    if hasattr(np, 'dtypes') and hasattr(np.dtypes, 'StringDType'):
        cases.append(('StringDType-array', np.array(['a', 'bb', ''], dtype=np.dtypes.StringDType())))
    return cases


NUMPY_CASES = _numpy_cases()


def _same(got: Any, expected: Any) -> bool:
    if type(got) is not type(expected):
        return False
    if isinstance(expected, np.dtype):
        return got == expected and got.str == expected.str and got.metadata == expected.metadata
    if isinstance(expected, (np.ndarray, np.generic)):
        if got.dtype != expected.dtype or got.dtype.str != expected.dtype.str or got.shape != expected.shape:
            return False
        if isinstance(expected, np.ndarray) and expected.flags.f_contiguous != got.flags.f_contiguous:
            return False
        if expected.dtype.hasobject or not getattr(type(expected.dtype), '_legacy', True):
            return got.tolist() == expected.tolist()
        return got.tobytes() == expected.tobytes()
    return got == expected


def test_extension_dtypes_stay_out_of_the_allowlist():
    """ml_dtypes (onnx imports it) registers dtypes in np.sctypeDict: they are not numpy's and are not allowed."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    classes = ckpt_io.numpy_dtype_classes()
    assert all(c.__module__.split('.')[0] == 'numpy' for c in classes)
    for name in ('bfloat16', 'float8_e5m2', 'int4'):  # numpy 1.x names numpy as these classes' module
        if hasattr(ml_dtypes, name):
            assert type(np.dtype(getattr(ml_dtypes, name))) not in set(_entry_names().values()), name


def test_numpy_cases_cover_every_dtype_class():
    covered = {type(v if isinstance(v, np.dtype) else v.dtype) for _, v in NUMPY_CASES
               if isinstance(v, (np.dtype, np.ndarray, np.generic))}
    missing = set(ckpt_io.numpy_dtype_classes()) - covered
    assert not missing, f'dtype classes without a test case: {sorted(map(str, missing))}'


@pytest.mark.parametrize('loader', list(LOADERS))
@pytest.mark.parametrize('case,value', NUMPY_CASES, ids=[c for c, _ in NUMPY_CASES])
def test_every_numpy_dtype_loads_weights_only(tmp_path, case, value, loader):
    loaded = LOADERS[loader](save_with_meta(value, tmp_path / 'v.pth'))['meta']['v']
    # The reference is what an unrestricted unpickler gives: numpy's pickles turn
    # np.longlong into the equal np.int64 and big-endian arrays into native ones.
    expected = pickle.loads(pickle.dumps(value, protocol=2))
    if not isinstance(value, np.dtype):
        assert repr(np.asarray(expected).tolist()) == repr(np.asarray(value).tolist()), (expected, value)
    assert _same(loaded, expected), f'{case}: {loaded!r} != {expected!r}'


def test_numpy_values_were_refused_without_the_allowlist(tmp_path):
    """What the allowlist fixes: in a process without orepa_mm, a float32 scalar is refused."""
    path = save_with_meta(np.float32(1.5), tmp_path / 'f32.pth')
    code = f'import torch\ntorch.load({str(path)!r}, weights_only=True)\n'
    out = run([sys.executable, '-c', code], cwd=tmp_path, check=False)
    # torch >= 2.6 says 'Unsupported global', older torch 'Unsupported class'.
    assert out.returncode != 0 and re.search('Unsupported (global|class)', out.stderr), out.stderr[-2000:]


# -- HistoryBuffer ------------------------------------------------------------------------
HISTORY_BUFFERS = {
    'empty': lambda: HistoryBuffer(),
    'float32': lambda: HistoryBuffer([np.float32(0.5), np.float32(1.5), np.float32(4.0)], [1, 1, 2]),
    'float64': lambda: HistoryBuffer([0.25, 0.75], [1, 1]),
}


def test_history_buffer_pickles_statistics_as_getattr():
    """Why getattr is allowlisted at all: HistoryBuffer pickles its statistics methods as getattr calls."""
    ops = {arg for op, arg, _ in pickletools.genops(pickle.dumps(HistoryBuffer(), protocol=2))
           if op.name == 'GLOBAL'}
    assert '__builtin__ getattr' in ops and '__builtin__ bytes' in ops, ops


@pytest.mark.parametrize('loader', list(LOADERS))
@pytest.mark.parametrize('kind', list(HISTORY_BUFFERS))
def test_history_buffer_loads_weights_only(tmp_path, kind, loader):
    buffer = HISTORY_BUFFERS[kind]()
    loaded = LOADERS[loader](save_with_meta({'loss': buffer}, tmp_path / 'hb.pth'))['meta']['v']['loss']
    assert type(loaded) is HistoryBuffer and loaded.max_length == buffer.max_length
    for got, expected in zip(loaded.data, buffer.data):
        assert _same(got, expected), (got, expected)
    if kind == 'float32':
        assert loaded.data[0].dtype == np.float32
    if len(buffer.data[0]):
        assert loaded.statistics('mean') == buffer.statistics('mean')
        assert loaded.current() == buffer.current()
    # Loading registered nothing but HistoryBuffer's own statistics methods.
    for name in ckpt_io.HISTORY_BUFFER_STATISTICS:
        assert HistoryBuffer._statistics_methods[name] is getattr(HistoryBuffer, name)


# -- real checkpoints ---------------------------------------------------------------------------
@pytest.mark.slow
def test_allowlist_covers_real_checkpoints(det_run, seg_run, f32_run):
    """Every global that real mmdet/mmseg checkpoints (one of them from a run
    that logs float32 values) hold, and the dtype class of every numpy value
    in them, is allowlisted."""
    allowed_names = set(_entry_names())
    allowed = set(_entry_names().values())
    found_names, found_classes = set(), set()
    # torch >= 2.5 lists a checkpoint's globals; before, loading through the
    # allowlist (which refuses any other global) is the whole check.
    scan = hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint')
    for ckpt in (det_run['ckpt'], seg_run['ckpt'], f32_run['ckpt']):
        if scan:  # in a fresh process: once orepa_mm is imported, torch stops reporting allowlisted globals
            out = run([sys.executable, '-c', 'import sys, torch; print("\\n".join('
                       'torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1])))', str(ckpt)],
                      cwd=ckpt.parent)
            found_names |= set(out.stdout.split())
        _numpy_dtype_classes(compat.load_weights_only(str(ckpt), map_location='cpu'), found_classes)
    if scan:
        assert {'builtins.getattr', 'mmengine.logging.history_buffer.HistoryBuffer'} <= found_names, found_names
        missing = sorted(found_names - allowed_names)
        assert not missing, f'globals missing from the allowlist: {missing}'
    assert type(np.dtype('float32')) in found_classes, found_classes
    assert found_classes <= allowed, f'dtype classes missing: {sorted(map(str, found_classes - allowed))}'


def _numpy_dtype_classes(obj: Any, found: set) -> set:
    """The dtype classes of the numpy values inside ``obj``."""
    if isinstance(obj, (np.ndarray, np.generic)):
        found.add(type(obj.dtype))
    elif isinstance(obj, dict):
        for v in obj.values():
            _numpy_dtype_classes(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _numpy_dtype_classes(v, found)
    elif hasattr(obj, '__dict__') and not torch.is_tensor(obj):
        _numpy_dtype_classes(vars(obj), found)
    return found


@pytest.mark.slow
@pytest.mark.parametrize('with_plugin', [True, False])
def test_default_torch_load_of_mmengine_checkpoint(det_run, with_plugin, tmp_path):
    if not with_plugin and compat.TORCH_VERSION < (2, 6):
        pytest.skip(f'torch {torch.__version__} loads without weights_only by default: nothing is refused')
    code = ('import torch\n' + ('import orepa_mm\n' if with_plugin else '')
            + f'ckpt = torch.load({str(det_run["ckpt"])!r}, map_location="cpu")\n'
            + 'assert "message_hub" in ckpt and "state_dict" in ckpt\n')
    out = run([sys.executable, '-c', code], cwd=tmp_path, check=False)
    if with_plugin:
        assert out.returncode == 0, out.stderr[-2000:]
    else:  # shows what the plugin fixes: mmengine's own checkpoint is refused by default
        assert out.returncode != 0 and 'Unsupported global' in out.stderr


F32_HOOK = '''"""A hook that logs float32 values into the message hub, as a metric computed with numpy does."""
import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS


@HOOKS.register_module()
class Float32LogHook(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        hub = runner.message_hub
        value = np.float32(0.25 * (runner.iter + 1))
        hub.update_scalar('train/f32_metric', value)
        hub.update_info('f32_metric', value)
        hub.update_info('f32_array', np.full(3, value, dtype=np.float32))
        hub.update_info('f16_metric', np.float16(value))
        hub.update_info('int32_count', np.int32(runner.iter))
        hub.update_info('bool_flag', np.bool_(True))
        hub.update_info('f32_history', HistoryBuffer([value, value], [1, 1]))
'''
F32_ITERS = 1


@pytest.fixture(scope='module')
def f32_run(toy_root: Path, tmp_path_factory) -> dict:
    """A toy PSPNet run (one iteration) with :data:`F32_HOOK`; its checkpoint."""
    d = tmp_path_factory.mktemp('f32_run')
    (d / 'f32_hook.py').write_text(F32_HOOK)
    cfg = d / 'pspnet_f32-hook_toy.py'
    cfg.write_text(f'_base_ = [{str(SEG_CFG)!r}]\n'
                   "custom_imports = dict(imports=['orepa_mm', 'f32_hook'], allow_failed_imports=False)\n"
                   "custom_hooks = [dict(type='Float32LogHook')]\n")
    work = d / 'work'
    env = {'PYTHONPATH': os.pathsep.join(filter(None, [str(d), os.environ.get('PYTHONPATH')]))}
    # Batch 2 (PSPNet's pooled BN needs two samples), no validation during training: the run is for its checkpoint.
    options = ['default_hooks.logger.interval=1', 'train_cfg.val_begin=1000', 'train_dataloader.batch_size=2']
    train = run([bin_path('mim'), 'train', 'mmseg', str(cfg), '--work-dir', str(work), '--cfg-options',
                 f'train_cfg.max_iters={F32_ITERS}', f'default_hooks.checkpoint.interval={F32_ITERS}', *options],
                cwd=toy_root, env=env)
    ckpt = work / f'iter_{F32_ITERS}.pth'
    assert ckpt.is_file(), train.stdout[-2000:]
    return dict(cfg=cfg, work=work, ckpt=ckpt, env=env, options=options)


@pytest.mark.slow
def test_float32_run_checkpoint_tests_and_resumes(f32_run, toy_root):
    ckpt = f32_run['ckpt']
    loaded = compat.load_weights_only(str(ckpt), map_location='cpu')
    info = loaded['message_hub']['runtime_info']
    # The checkpoint really holds what the issue found refused.
    assert type(info['f32_metric']) is np.float32 and info['f32_metric'] == np.float32(0.25 * F32_ITERS)
    assert info['f32_array'].dtype == np.float32 and type(info['f16_metric']) is np.float16
    assert type(info['int32_count']) is np.int32 and type(info['bool_flag']) is np.bool_
    assert info['f32_history'].data[0].dtype == np.float32
    assert 'train/f32_metric' in loaded['message_hub']['log_scalars']
    load_checkpoint_file(str(ckpt))

    test = run([bin_path('mim'), 'test', 'mmseg', str(f32_run['cfg']), '--checkpoint', str(ckpt), '--work-dir',
                str(f32_run['work'] / 'test'), '--cfg-options', 'test_dataloader.dataset.indices=1'],
               cwd=toy_root, env=f32_run['env'])
    assert 'mIoU' in test.stdout + test.stderr, (test.stdout + test.stderr)[-3000:]

    more = F32_ITERS + 1
    resume = run([bin_path('mim'), 'train', 'mmseg', str(f32_run['cfg']), '--work-dir', str(f32_run['work']),
                  '--resume', '--cfg-options', f'load_from={ckpt}', f'train_cfg.max_iters={more}',
                  f'default_hooks.checkpoint.interval={more}', *f32_run['options']],
                 cwd=toy_root, env=f32_run['env'])
    log = resume.stdout + resume.stderr
    assert f'resumed epoch: 0, iter: {F32_ITERS}' in log, log[-3000:]
    resumed = compat.load_weights_only(str(f32_run['work'] / f'iter_{more}.pth'), map_location='cpu')
    assert resumed['message_hub']['runtime_info']['f32_metric'] == np.float32(0.25 * more)
