"""The three ways a checkpoint is loaded in the checkpoint-safety tests
(``torch.load`` weights-only, mmengine's ``load_checkpoint``,
``orepa_mm.checkpoint.load_checkpoint_file``), and the checkpoint they load:
a one-layer state dict with the value under test in ``meta['v']``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import torch
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load_checkpoint

import orepa_mm  # noqa: F401  (installs the allowlist)
from orepa_mm.checkpoint import load_checkpoint_file


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location='cpu', weights_only=True)


def load_mmengine(path: Path) -> Any:
    model = torch.nn.Linear(2, 1)
    checkpoint = mmengine_load_checkpoint(model, str(path), map_location='cpu', strict=True)
    assert torch.equal(model.weight, torch.full((1, 2), 0.5))
    return checkpoint


def load_orepa(path: Path) -> Any:
    return load_checkpoint_file(str(path))


LOADERS: Dict[str, Callable[[Path], Any]] = {'torch.load': load_torch, 'mmengine.load_checkpoint': load_mmengine,
                                              'load_checkpoint_file': load_orepa}


def save_with_meta(value: Any, path: Path) -> Path:
    torch.save({'meta': {'v': value}, 'state_dict': {'weight': torch.full((1, 2), 0.5), 'bias': torch.zeros(1)}},
               path)
    return path
