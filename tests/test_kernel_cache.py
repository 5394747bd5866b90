"""The reused kernel of an OREPA layer whose branches need no gradient is never stale.

Every way a training scheme writes a second model's parameters (optimizer
steps, ``load_state_dict``, writes through ``.data``, ``p.data = t``,
``.to()``), in eval mode and in train mode with frozen parameters, with and
without ``no_grad``: the next forward equals a layer freshly built from the
written layer's own ``state_dict``, bitwise.  Then the second-model schemes
that need only mmengine and torch: mmengine's ``ExponentialMovingAverage`` as a
momentum encoder, mmdet's mean-teacher update, a frozen distillation teacher
and ``torch.optim.swa_utils.AveragedModel``, float64, at every step (on CUDA too
where the GPU check runs them: the ``device`` fixture).
The framework schemes (``EMAHook`` in a Runner, mmpretrain's MoCo) are in
``test_second_model_frameworks.py``.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn as nn
from mmengine.model import ExponentialMovingAverage
from torch.optim.swa_utils import AveragedModel

from numerics import _one_thread, _seed, randomize_  # noqa: F401  (autouse fixtures)
from orepa_mm.layers import OREPAConv2d

pytestmark = pytest.mark.core
DTYPE = torch.float64


def _layer(k: int = 3) -> OREPAConv2d:
    return randomize_(OREPAConv2d(6, 8, k, 1, k // 2, groups=2)).to(DTYPE)


def _fresh_like(layer: OREPAConv2d, k: int) -> OREPAConv2d:
    fresh = OREPAConv2d(6, 8, k, 1, k // 2, groups=2).to(dtype=next(layer.parameters()).dtype)
    fresh.load_state_dict(layer.state_dict())
    return fresh.train(layer.training)


def _params(layer: nn.Module) -> List[torch.Tensor]:
    return list(layer.branches.parameters())


def _sgd_step(layer: OREPAConv2d) -> None:
    """An optimizer step on a frozen layer's parameters (their gradients set by hand)."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


#: Each way of writing the parameters, applied to a layer whose kernel is cached.
WRITES: Dict[str, Callable[[OREPAConv2d], None]] = {
    'data.mul_': lambda m: [p.data.mul_(0.5) for p in _params(m)],
    'data.add_': lambda m: [p.data.add_(torch.randn_like(p)) for p in _params(m)],
    'data.lerp_': lambda m: [p.data.lerp_(torch.randn_like(p), 0.3) for p in _params(m)],
    'data.copy_': lambda m: [p.data.copy_(torch.randn_like(p)) for p in _params(m)],
    '_foreach_mul_ on .data': lambda m: torch._foreach_mul_([p.data for p in _params(m)], 1.5),
    '_foreach_add_ on .data': lambda m: torch._foreach_add_([p.data for p in _params(m)],
                                                          [torch.randn_like(p) for p in _params(m)]),
    'one element through .data': lambda m: _params(m)[0].data.view(-1)[0].add_(1.0),
    'p.data = tensor': lambda m: [setattr(p, 'data', torch.randn_like(p)) for p in _params(m)],
    'in-place under no_grad': lambda m: [p.mul_(0.5) for p in _params(m)],
    'optimizer step': _sgd_step,
    'load_state_dict': lambda m: m.load_state_dict(randomize_(_fresh_like(m, m.kernel_size[0])).state_dict()),
    '.to(float32)': lambda m: m.to(torch.float32),
}


@pytest.mark.parametrize('grad_mode', ['no_grad', 'grad'])
@pytest.mark.parametrize('mode', ['eval', 'frozen_train'])
@pytest.mark.parametrize('write', WRITES)
@pytest.mark.parametrize('k', (1, 3))
def test_written_parameters_are_seen_at_the_next_forward(k: int, write: str, mode: str, grad_mode: str) -> None:
    layer = _layer(k)
    if mode == 'eval':
        layer.eval()
    else:  # a frozen layer in train mode: an EMA copy or momentum encoder (requires_grad off)
        layer.train().requires_grad_(False)
    x = torch.randn(2, 6, 9, 8, dtype=DTYPE)
    context = torch.no_grad if grad_mode == 'no_grad' else torch.enable_grad
    with context():
        before = layer(x)  # fills the cache
        with torch.no_grad():
            WRITES[write](layer)
        x = x.to(next(layer.parameters()).dtype)
        got = layer(x)
        want = _fresh_like(layer, k).requires_grad_(False)(x)
    assert not torch.equal(got, before), 'the write changed nothing: the case tests nothing'
    assert torch.equal(got, want), f'{write}: stale kernel (max |diff| {(got - want).abs().max().item():.3e})'


def test_cache_is_reused_while_nothing_is_written() -> None:
    layer = _layer().eval()
    x = torch.randn(2, 6, 9, 8, dtype=DTYPE)
    with torch.no_grad():
        layer(x)
        kernel = layer._cache.kernel
        layer(x)
        assert layer._cache.kernel is kernel


def _cached_kernel_after(layer: OREPAConv2d, write: Callable[[], None]) -> torch.Tensor:
    x = torch.randn(2, 6, 9, 8, dtype=DTYPE)
    with torch.no_grad():
        layer(x)
        kernel = layer._cache.kernel
        write()
        layer(x)
    return kernel


def test_sign_of_zero_is_a_change() -> None:
    """Bitwise, not numerically equal: a parameter going from 0.0 to -0.0 gets a new kernel."""
    layer = _layer().eval()
    first = _params(layer)[0]
    with torch.no_grad():
        first.view(-1)[0] = 0.0
    kernel = _cached_kernel_after(layer, lambda: first.data.view(-1)[0].fill_(-0.0))
    assert layer._cache.kernel is not kernel


@pytest.mark.parametrize('path', ['memcmp', 'torch.equal fallback', 'channels_last parameters'])
def test_every_comparison_path_sees_a_data_write(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C library's memcmp compares contiguous CPU parameters; without it, or
    for non-contiguous ones, the bits are compared with torch.equal."""
    from orepa_mm.layers import kernel_cache
    layer = _layer().eval()
    if path == 'torch.equal fallback':
        monkeypatch.setattr(kernel_cache, '_memcmp', None)
    elif path == 'channels_last parameters':
        layer.to(memory_format=torch.channels_last)
        assert any(not p.is_contiguous() for p in _params(layer))
    else:
        assert kernel_cache._memcmp is not None, 'no memcmp on this platform: the fast path is untested'
    written = next((p for p in _params(layer) if not p.is_contiguous()), _params(layer)[-1])
    kernel = _cached_kernel_after(layer, lambda: written.data[(0,) * written.dim()].add_(1.0))
    assert layer._cache.kernel is not kernel
    x = torch.randn(2, 6, 9, 8, dtype=DTYPE)
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh_like(layer, 3).eval()(x))
        kernel = layer._cache.kernel
        layer(x)
    assert layer._cache.kernel is kernel, 'nothing was written: the kernel must be reused'


# -- second models, float64, at every step ---------------------------------------------
class _Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(OREPAConv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         OREPAConv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         OREPAConv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _net() -> nn.Module:
    return randomize_(_Net()).to(DTYPE)


def _fresh(model: nn.Module) -> nn.Module:
    """A model built anew and loaded with ``model``'s own state_dict, in ``model``'s mode."""
    fresh = _Net().to(DTYPE)
    fresh.load_state_dict(model.state_dict())
    return fresh.train(model.training)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check_every_step(second: nn.Module, update: Callable[[nn.Module], None], steps: int = 4,
                      run_mode: str = 'train') -> List[float]:
    """Train a student, ``update(student)`` the second model after each step, run
    the second model (train mode: a momentum encoder; eval: a teacher) under
    no_grad and compare it with a fresh model from its state_dict."""
    torch.manual_seed(1)
    student = _net()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    errors = []
    for step in range(steps):
        x = torch.randn(4, 3, 12, 12, dtype=DTYPE)
        _train_step(student, opt, x)
        update(student)
        second.train(run_mode == 'train')
        with torch.no_grad():
            got = second(x)
            want = _fresh(second)(x)
        errors.append(_rel(got, want))
    return errors


def test_momentum_encoder_ema_is_never_stale(device) -> None:
    """The issue's probe: mmengine's ExponentialMovingAverage (what EMAHook and
    mmpretrain's momentum encoders build), run in train mode under no_grad."""
    ema = ExponentialMovingAverage(_net(), momentum=0.2)
    errors = _check_every_step(ema.module, ema.update_parameters)
    assert errors == [0.0] * 4, errors


def test_ema_teacher_in_eval_mode_is_never_stale(device) -> None:
    ema = ExponentialMovingAverage(_net(), momentum=0.2, update_buffers=True)
    errors = _check_every_step(ema.module, ema.update_parameters, run_mode='eval')
    assert errors == [0.0] * 4, errors


def test_mean_teacher_update_is_never_stale(device) -> None:
    """mmdet's MeanTeacherHook.momentum_update on a student/teacher pair, as
    SemiBaseDetector holds them (the teacher frozen, run in eval)."""
    mmdet_hooks = pytest.importorskip('mmdet.engine.hooks', reason='mmdet (with mmcv ops) is not installed')
    hook = mmdet_hooks.MeanTeacherHook(momentum=0.3)
    pair = nn.Module()
    pair.teacher = _net().requires_grad_(False)

    def update(student: nn.Module) -> None:
        pair.student = student
        hook.momentum_update(pair, 0.3)

    errors = _check_every_step(pair.teacher, update, run_mode='eval')
    assert errors == [0.0] * 4, errors


def test_swa_averaged_model_is_never_stale(device) -> None:
    swa = AveragedModel(_net())
    errors = _check_every_step(swa.module, swa.update_parameters, run_mode='eval')
    assert errors == [0.0] * 4, errors


def test_frozen_distillation_teacher_after_reload(device) -> None:
    """A frozen teacher (eval, requires_grad off) stays exact, also when its
    weights are swapped mid-training through ``.data`` copies."""
    teacher = _net().eval().requires_grad_(False)
    source = _net()
    calls = []

    def update(student: nn.Module) -> None:
        calls.append(1)
        if len(calls) == 2:  # a new teacher checkpoint copied in, as a user's hook would
            for p, q in zip(teacher.parameters(), source.parameters()):
                p.data.copy_(q.data)

    errors = _check_every_step(teacher, update, run_mode='eval')
    assert errors == [0.0] * 4, errors


def test_copies_do_not_share_a_cache() -> None:
    model = _net().eval()
    x = torch.randn(2, 3, 12, 12, dtype=DTYPE)
    with torch.no_grad():
        model(x)
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.data.mul_(1.5)
        assert torch.equal(other(x), _fresh(other)(x))
        assert torch.equal(model(x), _fresh(model)(x))
