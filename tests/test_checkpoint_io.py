"""orepa_mm.checkpoint as the tools' checkpoint I/O: reading a file with one
clear error per failure, finding the state dict in any common layout, and
writing files atomically."""
from __future__ import annotations

import os
import stat
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from orepa_mm.checkpoint import (
    CheckpointError,
    atomic_write,
    atomic_write_text,
    extract_state_dict,
    load_checkpoint_file,
    save_atomic,
)

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core


def _state() -> 'OrderedDict[str, torch.Tensor]':
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).state_dict()


def _single_line_error(fn, *args, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert '\n' not in message, message
    return message


# -- load_checkpoint_file ---------------------------------------------------------------------
def test_load_checkpoint_file_reads_a_checkpoint(tmp_path):
    path = tmp_path / 'ok.pth'
    state = _state()
    torch.save({'state_dict': state, 'meta': {'iter': 3}}, path)
    loaded = load_checkpoint_file(str(path))
    assert loaded['meta'] == {'iter': 3} and torch.equal(loaded['state_dict']['0.weight'], state['0.weight'])


def test_load_checkpoint_file_errors(tmp_path):
    _single_line_error(load_checkpoint_file, str(tmp_path / 'missing.pth'), match='checkpoint not found: .*missing')
    _single_line_error(load_checkpoint_file, str(tmp_path), match='checkpoint not found')  # a directory
    text = tmp_path / 'text.pth'
    text.write_text('not a checkpoint\n' * 10)
    _single_line_error(load_checkpoint_file, str(text), match='corrupt or truncated')
    full = tmp_path / 'full.pth'
    torch.save({'state_dict': _state()}, full)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _single_line_error(load_checkpoint_file, str(cut), match=r'cannot read checkpoint .*cut\.pth.*corrupt or truncated')
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    _single_line_error(load_checkpoint_file, str(empty), match='corrupt or truncated')


# -- extract_state_dict -------------------------------------------------------------------------
@pytest.mark.parametrize('layout', ['bare', 'state_dict', 'model', 'state_dict+model'])
@pytest.mark.parametrize('wrapped', [False, True])
def test_extract_state_dict_layouts(layout, wrapped):
    state = _state()
    stored = OrderedDict((f'module.{k}' if wrapped else k, v) for k, v in state.items())
    stored._metadata = OrderedDict(((f'module.{k}' if k else 'module') if wrapped else k, v)
                                   for k, v in state._metadata.items())
    if wrapped:
        stored._metadata[''] = {'version': 1}  # the wrapper's own entry
    checkpoint = {'bare': stored, 'state_dict': {'state_dict': stored, 'meta': {}},
                  'model': {'model': stored, 'epoch': 3},
                  'state_dict+model': {'state_dict': stored, 'model': {'ignored': torch.zeros(1)}}}[layout]
    got = extract_state_dict(checkpoint, 'x.pth')
    assert list(got) == list(state)
    assert all(got[k] is stored[('module.' if wrapped else '') + k] for k in state)
    assert dict(got._metadata) == dict(state._metadata)
    target = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    target.load_state_dict(got, strict=True)
    assert torch.equal(target[0].weight, state['0.weight'])


def test_extract_state_dict_strips_module_only_if_all_keys_have_it():
    t = torch.zeros(1)
    assert list(extract_state_dict({'module.a': t, 'b': t})) == ['module.a', 'b']
    assert list(extract_state_dict({'module.a': t, 'module.b': t})) == ['a', 'b']
    assert list(extract_state_dict({'modules.a': t})) == ['modules.a']


def test_extract_state_dict_allows_extra_state():
    t = torch.zeros(1)
    got = extract_state_dict({'a.weight': t, 'a._extra_state': {'scale': 2}})
    assert got['a._extra_state'] == {'scale': 2}


def test_extract_state_dict_errors():
    t = torch.zeros(1)
    _single_line_error(extract_state_dict, [t], 'x.pth', match=r'x\.pth holds no state dict: .*got a list')
    _single_line_error(extract_state_dict, {}, 'x.pth', match=r'x\.pth holds an empty state dict')
    _single_line_error(extract_state_dict, {'state_dict': {}}, 'x.pth', match='empty state dict')
    _single_line_error(extract_state_dict, {'state_dict': [t]}, 'x.pth',
                       match=r"x\.pth: 'state_dict' holds a list, not a state dict")
    message = _single_line_error(extract_state_dict, {'epoch': 3, 'optimizer': {}}, 'x.pth',
                                 match=r"x\.pth holds no state dict: 'epoch' is a int, not a tensor")
    assert 'keys: epoch, optimizer' in message
    _single_line_error(extract_state_dict, {1: t}, None, match=r'the checkpoint holds no state dict: key 1 is a int')


# -- atomic writes --------------------------------------------------------------------------------
def _leftovers(directory: Path, keep: set) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_save_atomic_roundtrip_creates_parent_and_leaves_nothing(tmp_path):
    path = tmp_path / 'new' / 'dir' / 'model.pth'
    save_atomic({'state_dict': _state()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)['state_dict']['1.running_var'], torch.ones(3))
    assert _leftovers(path.parent, {'model.pth'}) == []


def test_save_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / 'model.pth'
    save_atomic({'v': 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_atomic({'v': lambda: None}, str(path))  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {'model.pth'}) == []


def test_save_atomic_failure_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        save_atomic({'v': lambda: None}, str(tmp_path / 'model.pth'))
    assert _leftovers(tmp_path, set()) == []


def test_atomic_write_interrupt_cleans_up(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text('old = 1\n')

    def write(tmp: str) -> None:
        Path(tmp).write_text('half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), write)
    assert path.read_text() == 'old = 1\n' and _leftovers(tmp_path, {'cfg.py'}) == []


def test_atomic_write_keeps_the_extension_and_replaces(tmp_path):
    path = tmp_path / 'deploy.py'
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_text('x = 2\n')

    atomic_write(str(path), write)
    assert seen[0].endswith('.py') and os.path.dirname(seen[0]) == str(tmp_path) and seen[0] != str(path)
    assert path.read_text() == 'x = 2\n' and _leftovers(tmp_path, {'deploy.py'}) == []


def test_atomic_write_refuses_a_writer_that_wrote_nothing(tmp_path):
    with pytest.raises(OSError, match='left no file'):
        atomic_write(str(tmp_path / 'out.onnx'), os.remove)
    assert _leftovers(tmp_path, set()) == []


def test_atomic_write_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / 'fresh.pth'
        save_atomic({}, str(fresh))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # as open() would, not mkstemp's 0600
        kept = tmp_path / 'kept.txt'
        kept.write_text('a')
        kept.chmod(0o640)
        atomic_write_text(str(kept), 'b')
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == 'b'
    finally:
        os.umask(old)


def test_atomic_write_text(tmp_path):
    path = tmp_path / 'sub' / 'notes.txt'
    atomic_write_text(str(path), 'Ünïcode\nline 2\n')
    assert path.read_text(encoding='utf-8') == 'Ünïcode\nline 2\n'
    assert _leftovers(path.parent, {'notes.txt'}) == []
