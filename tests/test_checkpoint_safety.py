"""Weights-only loading of mmengine checkpoints under torch >= 2.6: importing
orepa_mm allowlists exactly the globals real mmdet/mmseg checkpoints hold,
and a checkpoint with any other global (a pickled os.system call) is refused."""
from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch

from conftest import run

pytestmark = pytest.mark.slow


def _name(obj) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


def _numpy_dtype_classes(obj, found: set) -> set:
    """Names of the numpy dtype classes of the arrays/scalars inside ``obj``
    (the unpickler needs them to restore dtype state)."""
    import numpy as np
    if isinstance(obj, (np.ndarray, np.generic)):
        found.add(_name(type(obj.dtype)))
    elif isinstance(obj, dict):
        for v in obj.values():
            _numpy_dtype_classes(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _numpy_dtype_classes(v, found)
    elif hasattr(obj, '__dict__') and not torch.is_tensor(obj):
        _numpy_dtype_classes(vars(obj), found)
    return found


def test_allowlist_is_exactly_what_real_checkpoints_hold(det_run, seg_run):
    from orepa_mm.checkpoint import safe_globals
    allowed = {_name(g) for g in safe_globals()}
    found = set()
    for ckpt in (det_run['ckpt'], seg_run['ckpt']):
        # In a fresh process: once orepa_mm is imported, torch stops reporting
        # the allowlisted globals as unsafe.
        out = run([sys.executable, '-c', 'import sys, torch; print("\\n".join('
                   'torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1])))', str(ckpt)],
                  cwd=ckpt.parent)
        found |= set(out.stdout.split())
        _numpy_dtype_classes(torch.load(ckpt, map_location='cpu'), found)
    assert found <= allowed, f'globals missing from the allowlist: {sorted(found - allowed)}'
    assert allowed <= found, f'allowlisted but never seen in a checkpoint: {sorted(allowed - found)}'


@pytest.mark.parametrize('with_plugin', [True, False])
def test_default_torch_load_of_mmengine_checkpoint(det_run, with_plugin, tmp_path):
    code = ('import torch\n' + ('import orepa_mm\n' if with_plugin else '')
            + f'ckpt = torch.load({str(det_run["ckpt"])!r}, map_location="cpu")\n'
            + 'assert "message_hub" in ckpt and "state_dict" in ckpt\n')
    out = run([sys.executable, '-c', code], cwd=tmp_path, check=False)
    if with_plugin:
        assert out.returncode == 0, out.stderr[-2000:]
    else:  # shows what the plugin fixes: mmengine's own checkpoint is refused by default
        assert out.returncode != 0 and 'Unsupported global' in out.stderr


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_checkpoint_with_os_system_is_refused(tmp_path):
    from mmengine.runner import load_checkpoint

    import orepa_mm  # noqa: F401  (installs the allowlist)
    from orepa_mm.checkpoint import CheckpointError, load_checkpoint_file
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': _Exploit(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match='system'):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(torch.nn.Linear(1, 1), str(path))
    with pytest.raises(CheckpointError, match='allowlist'):
        load_checkpoint_file(str(path))
    assert not marker.exists()
