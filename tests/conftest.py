"""Shared fixtures: the repository root, toy data and subprocess helpers."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'

# Under xdist every worker (and every process it starts: mim, the tools) computes
# on one thread: two workers with torch's default of one thread per core would
# oversubscribe the cores, and OpenMP's spinning threads then slow both down.
if os.environ.get('PYTEST_XDIST_WORKER'):
    for _var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[_var] = '1'
    torch.set_num_threads(1)


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(cmd: List[str], cwd: Path, env: Optional[dict] = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, return the completed process; on failure show its output tail."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, cwd=str(cwd), env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'command failed ({proc.returncode}): {" ".join(map(str, cmd))}\n'
                             f'--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}')
    return proc


def last_metric(text: str, key: str) -> float:
    """The last value of ``key: <number>`` in an mmengine log."""
    found = re.findall(re.escape(key) + r': (-?[0-9.]+)', text)
    assert found, f'no {key} in output:\n{text[-3000:]}'
    return float(found[-1])


def bin_path(name: str) -> str:
    """An executable of the running interpreter's environment (e.g. mim)."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope='session')
def _session_default_scopes() -> dict:
    from mmengine.registry import DefaultScope
    return DefaultScope._instance_dict.copy()


@pytest.fixture(autouse=True)
def _default_scope_as_at_start(_session_default_scopes: dict) -> Iterator[None]:
    """Every test starts and ends with mmengine's default scope as the session
    began with it.  Loading a config or ``register_all_modules(init_default_scope=True)``
    makes one framework the default, and a later build from the other
    framework's registry would look its types up in the wrong registry; the
    reset before the test also undoes what module-scoped fixtures (set up
    before this one) left."""
    from mmengine.registry import DefaultScope

    def reset() -> None:
        DefaultScope._instance_dict.clear()
        DefaultScope._instance_dict.update(_session_default_scopes)
    reset()
    yield
    reset()


#: The devices a test that takes the ``device`` fixture runs on: the CPU
#: always, CUDA wherever a CUDA device is present (the GPU check).
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason='no CUDA device'))]


@pytest.fixture(params=DEVICES)
def device(request) -> Iterator[torch.device]:
    """The device under test.  On CUDA, tensors and modules are created there
    by default while the test runs, and TF32 is off (the tests compare float32
    results to 1e-5)."""
    if request.param == 'cpu':
        yield torch.device('cpu')
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device('cuda')
    try:
        yield torch.device('cuda', torch.cuda.current_device())
    finally:
        torch.set_default_device('cpu')
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (shared by the xdist workers' processes)."""
    with open(lock, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(folder)``, computed once per test run and shared by every xdist worker.

    The first worker to ask runs it in ``<run>/shared/<name>/`` while the others
    wait on a lock, then all read its pickled result: an expensive fixture (toy
    data, a training run) costs the same with ``-n 2`` as in one process.  A
    ``make`` that raised is retried by the next worker that asks."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'shared'
    shared.mkdir(exist_ok=True)
    done = shared / f'{name}.pkl'
    with _exclusive(shared / f'{name}.lock'):
        if done.is_file():
            return pickle.loads(done.read_bytes())
        folder = shared / name
        shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
        folder.mkdir()
        value = make(folder)
        done.write_bytes(pickle.dumps(value))
        return value


def _make_toy_data(root: Path) -> Path:
    from orepa_mm import toy_data as toy
    toy.make_coco(root / 'data' / 'toy' / 'coco', 16, 8, 160, 0)
    toy.make_cityscapes(root / 'data' / 'toy' / 'cityscapes', 8, 4, (128, 256), 0)
    toy.make_imagenet(root / 'data' / 'toy' / 'imagenet', 48, 24, 64, 0)
    return root


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory) -> Path:
    """A working directory holding ``data/toy/{coco,cityscapes,imagenet}``
    (small sets), so configs with ``data_root='data/toy/...'`` run from it unchanged.
    One per test run (:func:`once_per_run`): tests write into it under names of their own."""
    return once_per_run(tmp_path_factory, 'toywork', _make_toy_data)


@pytest.fixture(scope='session')
def no_orepa_env(tmp_path_factory) -> dict:
    """Environment for a subprocess in which ``import orepa_mm`` fails, to prove
    that deploy artefacts do not need the package."""
    d = tmp_path_factory.mktemp('block_orepa')
    (d / 'sitecustomize.py').write_text(
        'import importlib.abc, sys\n'
        'class _Block(importlib.abc.MetaPathFinder):\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name == 'orepa_mm' or name.startswith('orepa_mm.'):\n"
        "            raise ModuleNotFoundError('orepa_mm is blocked in this process')\n"
        '        return None\n'
        'sys.meta_path.insert(0, _Block())\n')
    return {'PYTHONPATH': str(d)}


# -- real training runs, shared by the end-to-end, safety and fuse tests ------------
DET_CFG = ROOT / 'configs/toy/faster-rcnn_r18w16-orepa_fpn_300i_toy-coco.py'
SEG_CFG = ROOT / 'configs/toy/pspnet_r18w32-d8-orepa_1xb4-300i_toy-cityscapes-128x256.py'
CLS_CFG = ROOT / 'configs/toy/resnet18w32-orepa_1xb32-600i_toy-imagenet.py'
DET_ITERS, SEG_ITERS, CLS_ITERS = 20, 10, 10
#: After 20 iterations the toy Faster R-CNN may score every box under mmdet's
#: default 0.05 threshold (it did on CI), and CocoMetric then reports no mAP at
#: all: the tests keep every detection, in training's evaluation and in `mim test`.
DET_KEEP_ALL = ['model.test_cfg.rcnn.score_thr=0.0']


def _iters(n: int, ckpt_every: int) -> list:
    return ['--cfg-options', f'train_cfg.max_iters={n}', f'train_cfg.val_interval={n}',
            f'default_hooks.checkpoint.interval={ckpt_every}', 'default_hooks.logger.interval=5']


def mim_train_and_test(framework: str, cfg: Path, toy_root: Path, name: str, iters: int, ckpt_every: int,
                       train_extra: Sequence[str] = (), test_extra: Sequence[str] = ()) -> dict:
    """``mim train`` ``cfg`` for ``iters`` iterations in ``<toy_root>/work_<name>``, then ``mim test``
    its last checkpoint; the work folder, the checkpoint and both runs' output."""
    work = toy_root / f'work_{name}'
    train = run([bin_path('mim'), 'train', framework, str(cfg), '--work-dir', str(work)]
                + _iters(iters, ckpt_every) + list(train_extra), cwd=toy_root)
    ckpt = work / f'iter_{iters}.pth'
    assert ckpt.is_file(), (train.stdout + train.stderr)[-2000:]
    test = run([bin_path('mim'), 'test', framework, str(cfg), '--checkpoint', str(ckpt), '--work-dir',
                str(toy_root / f'test_{name}')] + list(test_extra), cwd=toy_root)
    return dict(work=work, ckpt=ckpt, train=train.stdout + train.stderr, test=test.stdout + test.stderr)


@pytest.fixture(scope='session')
def det_run(toy_root: Path, tmp_path_factory) -> dict:
    """The toy OREPA Faster R-CNN trained and tested with ``mim``, once per test run."""
    return once_per_run(tmp_path_factory, 'det_run', lambda _: mim_train_and_test(
        'mmdet', DET_CFG, toy_root, 'det', DET_ITERS, DET_ITERS // 2, DET_KEEP_ALL,
        ['--out', str(toy_root / 'det_preds.pkl'), '--cfg-options'] + DET_KEEP_ALL))


@pytest.fixture(scope='session')
def seg_run(toy_root: Path, tmp_path_factory) -> dict:
    """The toy OREPA PSPNet trained and tested with ``mim``, once per test run."""
    return once_per_run(tmp_path_factory, 'seg_run',
                        lambda _: mim_train_and_test('mmseg', SEG_CFG, toy_root, 'seg', SEG_ITERS, SEG_ITERS))


@pytest.fixture(scope='session')
def cls_run(toy_root: Path, tmp_path_factory) -> dict:
    """The toy OREPA classifier trained and tested with ``mim``, once per test run."""
    return once_per_run(tmp_path_factory, 'cls_run',
                        lambda _: mim_train_and_test('mmpretrain', CLS_CFG, toy_root, 'cls', CLS_ITERS, CLS_ITERS))


# -- figures that tests measure and report (printed at the end of the run) --------
REPORT: dict = {}


def pytest_sessionfinish(session) -> None:
    """Under xdist, a worker hands its measurements to the controller."""
    workeroutput = getattr(session.config, 'workeroutput', None)
    if workeroutput is not None:
        workeroutput['orepa_mm_report'] = dict(REPORT)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: collect a finished worker's measurements."""
    REPORT.update(getattr(node, 'workeroutput', {}).get('orepa_mm_report', {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if REPORT:
        terminalreporter.section('orepa_mm measurements')
        for key, value in REPORT.items():
            terminalreporter.write_line(f'{key}: {value}')


# -- the compatibility job's selection ----------------------------------------------
#: The line by which a test file says that it tests the library alone (pytest marker ``core``).
CORE_FILE_MARK = 'pytestmark = pytest.mark.core'


def pytest_addoption(parser) -> None:
    parser.addoption('--core', action='store_true',
                     help='run only the test files marked core, less their tests marked slow: the library '
                          'without mmcv ops or mmdet/mmseg (what the compatibility job runs on the oldest torch)')


def pytest_ignore_collect(collection_path: Path, config) -> Optional[bool]:
    # Other files import mmdet/mmseg at the top: with --core they are not even imported.
    if config.getoption('--core') and collection_path.suffix == '.py' and collection_path.name.startswith('test_'):
        return CORE_FILE_MARK not in collection_path.read_text(encoding='utf-8')
    return None


def _writes_files_once_per_module(item) -> bool:
    """Whether ``item`` uses a module-scoped fixture of its own file that writes files
    (it asks for the shared toy working directory or for pytest's temporary folders)."""
    module_id = item.nodeid.split('::')[0]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for d in defs:
            if d.scope == 'module' and d.baseid == module_id and {'toy_root', 'tmp_path_factory'} & set(d.argnames):
                return True
    return False


def pytest_collection_modifyitems(config, items) -> None:
    # Under xdist (`--dist loadgroup`) tests spread over the workers one by one,
    # except a file whose module fixture writes files (a training run, a
    # converted checkpoint): its tests stay on one worker, so that the fixture
    # runs once and two workers never write the same paths.
    if config.pluginmanager.hasplugin('xdist'):
        for item in items:
            if _writes_files_once_per_module(item):
                item.add_marker(pytest.mark.xdist_group(item.nodeid.split('::')[0]))
    if not config.getoption('--core'):
        return
    keep = [item for item in items if item.get_closest_marker('core') and not item.get_closest_marker('slow')]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
