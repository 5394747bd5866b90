"""The ways a checkpoint is loaded in the checkpoint-safety tests, and the
checkpoint they load: a one-layer state dict with the value under test in
``meta['v']``.

``orepa_mm.checkpoint.load_checkpoint_file`` is tested on every torch.  On
torch >= 2.6, whose ``torch.load`` is weights-only by default and takes
orepa_mm's allowlist, so are a bare ``torch.load(weights_only=True)`` and
mmengine's ``load_checkpoint``.  On older torch these two are not weights-only
with an allowlist (mmengine unpickles as it always did there), so they are
not part of what the tests hold."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import torch
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load_checkpoint

import orepa_mm  # noqa: F401  (installs the allowlist)
from orepa_mm import compat
from orepa_mm.checkpoint import load_checkpoint_file


def load_torch(path: Path) -> Any:
    """Weights-only loading with orepa_mm's allowlist, without its numpy check:
    torch's own on torch >= 2.6, :class:`orepa_mm.compat.RestrictedUnpickler` before."""
    return compat.load_weights_only(str(path), map_location='cpu')


def load_mmengine(path: Path) -> Any:
    model = torch.nn.Linear(2, 1)
    checkpoint = mmengine_load_checkpoint(model, str(path), map_location='cpu', strict=True)
    assert torch.equal(model.weight, torch.full((1, 2), 0.5))
    return checkpoint


def load_orepa(path: Path) -> Any:
    return load_checkpoint_file(str(path))


LOADERS: Dict[str, Callable[[Path], Any]] = {'load_checkpoint_file': load_orepa}
if compat.HAS_SAFE_GLOBALS:
    LOADERS.update({'torch.load': load_torch, 'mmengine.load_checkpoint': load_mmengine})


def save_with_meta(value: Any, path: Path) -> Path:
    torch.save({'meta': {'v': value}, 'state_dict': {'weight': torch.full((1, 2), 0.5), 'bias': torch.zeros(1)}},
               path)
    return path
