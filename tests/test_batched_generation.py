"""Kernel generation batched across same-shape layers (``orepa_mm.layers.batched_generation``).

Every training-time use of OREPA layers must give exactly the gradients of the
per-layer definition: each test runs the same model twice, once as shipped
(batched groups) and once with every layer computing ``conv2d(x, kernel)``
from its own generator (``per_layer``), in float64 unless it tests a
precision, and compares outputs and parameter gradients relative to their
own scale.  The operator count of a training step is the CI-stable proxy for
launch overhead: it is exact and does not depend on the input size
(counted with the benchmark tool's counter, views apart).
"""
from __future__ import annotations

import copy
import gc
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import orepa_mm
from orepa_mm.compat import grad_scaler
from orepa_mm.layers import OREPAConv2d, batched_generation, set_generation_capture

# The benchmark's operator counter: the figure the README reports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))
from benchmark_lib import counters  # noqa: E402

from conftest import REPORT  # noqa: E402
from numerics import CPU_FLOAT16  # noqa: E402
from slim_resnet import SlimResNet  # noqa: E402

# The library itself: run on the oldest supported torch too (the compatibility job).
pytestmark = pytest.mark.core

REL = {torch.float64: 1e-10, torch.float32: 1e-5}


# -- helpers -------------------------------------------------------------------------
@pytest.fixture
def per_layer(monkeypatch) -> Callable[[], None]:
    """Call to switch OREPAConv2d to the per-layer definition for the rest of the test."""
    def switch() -> None:
        def forward(self, x):
            x, padding = self._pad_input(x)
            return F.conv2d(x, self.branches(), self.bias, self.stride, padding, self.dilation, self.groups)
        monkeypatch.setattr(OREPAConv2d, 'forward', forward)
    return switch


@pytest.fixture(params=['eager', 'replay'])
def capture(request, device) -> str:
    """Run the test with eager generation and with replayed generation:
    CUDA graphs on CUDA, elsewhere ``'simulate'`` (the fixed buffers of a
    CUDA graph, computed eagerly)."""
    mode = 'off' if request.param == 'eager' else 'cuda' if device.type == 'cuda' else 'simulate'
    batched_generation._GROUPS.clear()
    set_generation_capture(mode)
    yield mode
    set_generation_capture('off')
    batched_generation._GROUPS.clear()


def resnet(depth: int = 18, dtype=torch.float64, seed: int = 0, **kwargs) -> nn.Module:
    """A slim ResNet with OREPA convs and every branch contributing."""
    torch.manual_seed(seed)
    model = SlimResNet(depth=depth, base_channels=8, conv_cfg=dict(type='OREPA'), **kwargs).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('branch_scales'):
                p.uniform_(0.5, 1.5)
            elif name.endswith(('_first', '_second')):
                p.add_(torch.randn_like(p) * 0.3)
    model.train()
    return model


def loss_of(outputs) -> torch.Tensor:
    outs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)).sum() for o in outs)


def grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def assert_same_grads(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], tol: float) -> None:
    assert expected.keys() == got.keys(), sorted(set(expected) ^ set(got))
    worst = max((rel(expected[k], got[k]), k) for k in expected)
    assert worst[0] <= tol, f'gradient of {worst[1]} differs by {worst[0]:.2e} (relative)'


def run_both(build: Callable[[], nn.Module], step: Callable[[nn.Module], object], per_layer) -> tuple:
    """(outputs, grads) of ``step`` on the shipped model and on the per-layer definition."""
    model = build()
    out = step(model)
    got = grads(model)
    per_layer()
    reference = build()
    ref_out = step(reference)
    return (ref_out, grads(reference)), (out, got)


def ops_per_step(model: nn.Module, size: int) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    x = torch.randn(2, 3, size, size)

    def step() -> None:
        loss_of(model(x)).backward()
        opt.step()
        opt.zero_grad()
    step()
    step()
    counter, _ = counters.count_ops(step)
    return counter.total


# -- exactness of the training step ---------------------------------------------------
def test_resnet_step_matches_per_layer_definition(per_layer, capture):
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    (ref_out, ref), (out, got) = run_both(lambda: resnet(50), lambda m: loss_of(m(x)).backward() or m(x),
                                          per_layer)
    assert_same_grads(ref, got, REL[torch.float64])
    assert len(got) == len(list(resnet(50).parameters()))


def test_steps_with_an_optimizer_stay_exact(per_layer, capture):
    """Several optimizer steps: the packed parameters are updated in place
    and every step regenerates from the new values."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def three_steps(model: nn.Module) -> torch.Tensor:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        for _ in range(3):
            loss_of(model(x)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        return model(x)[-1]
    (ref_out, ref), (out, got) = run_both(resnet, three_steps, per_layer)
    assert rel(ref_out, out) <= REL[torch.float64]
    assert_same_grads(ref, got, REL[torch.float64])


def test_optimizer_sees_ordinary_per_layer_parameters(device):
    model = resnet()
    before = [(n, p, tuple(p.shape)) for n, p in model.named_parameters()]
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loss_of(model(torch.randn(2, 3, 32, 32, dtype=torch.float64))).backward()
    after = [(n, p, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [(n, id(p), s) for n, p, s in before] == [(n, id(p), s) for n, p, s in after]
    assert all(isinstance(p, nn.Parameter) and p.is_leaf and p.grad is not None for _, p, _ in after)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    # Each parameter steps on its own: a value written into one layer changes that layer only.
    conv = model.layer1[0].conv1
    other = model.layer1[1].conv1
    kept = other.branches.weight_origin.detach().clone()
    with torch.no_grad():
        conv.branches.weight_origin.add_(1.0)
    assert torch.equal(other.branches.weight_origin, kept)


def test_gradient_accumulation(per_layer, capture):
    x1, x2 = (torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2))

    def accumulate(model: nn.Module) -> None:
        loss_of(model(x1)).backward()
        loss_of(model(x2)).backward()
    (_, ref), (_, got) = run_both(resnet, accumulate, per_layer)
    assert_same_grads(ref, got, REL[torch.float64])


def test_two_forwards_then_one_backward(per_layer, capture):
    x1, x2 = (torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2))
    (_, ref), (_, got) = run_both(resnet, lambda m: (loss_of(m(x1)) + 2 * loss_of(m(x2))).backward(), per_layer)
    assert_same_grads(ref, got, REL[torch.float64])


class SharedHead(nn.Module):
    """A conv applied to several levels (RetinaNet's head), a layer never reached, a bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(OREPAConv2d(6, 6, 3, padding=1, bias=True) for _ in range(3))
        self.unused = OREPAConv2d(6, 6, 3, padding=1)
        self.point = OREPAConv2d(6, 4, 1)
        for p in self.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)

    def forward(self, levels: List[torch.Tensor]) -> List[torch.Tensor]:
        outs = []
        for x in levels:
            for conv in self.convs:
                x = torch.relu(conv(x))
            outs.append(self.point(x))
        return outs


def test_conv_shared_across_levels_and_unreached_layer(per_layer, capture):
    levels = [torch.randn(2, 6, s, s, dtype=torch.float64) for s in (16, 8, 4, 2, 1)]
    (_, ref), (_, got) = run_both(lambda: SharedHead().double(), lambda m: loss_of(m(levels)).backward(), per_layer)
    assert_same_grads(ref, got, REL[torch.float64])
    assert not any(k.startswith('unused.') for k in got), 'a layer not reached got gradients'


def test_frozen_stages_and_partly_frozen_layers(per_layer, capture):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def build() -> nn.Module:
        model = resnet(frozen_stages=1)
        model.layer2[0].conv1.branches.branch_scales.requires_grad_(False)
        return model
    (_, ref), (_, got) = run_both(build, lambda m: loss_of(m(x)).backward(), per_layer)
    assert_same_grads(ref, got, REL[torch.float64])
    assert not any(k.startswith(('conv1.', 'layer1.')) for k in got)
    assert 'layer2.0.conv1.branches.branch_scales' not in got


@pytest.mark.parametrize('reentrant', [True, False])
def test_with_cp(per_layer, monkeypatch, reentrant, capture):
    import torch.utils.checkpoint as cp
    original = cp.checkpoint
    monkeypatch.setattr(cp, 'checkpoint', lambda fn, *a, **kw: original(fn, *a, use_reentrant=reentrant))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (_, ref), (_, got) = run_both(lambda: resnet(with_cp=True), lambda m: loss_of(m(x)).backward(), per_layer)
    assert_same_grads(ref, got, REL[torch.float64])


def test_two_models_in_one_process(per_layer, capture):
    """A student with an EMA copy (frozen) and a teacher (no grad), and two
    models trained together: each gets exactly its own gradients."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def step(pair) -> None:
        student, other = pair
        ema = copy.deepcopy(student).requires_grad_(False)
        ema.eval()
        with torch.no_grad():
            teacher_out = ema(x)[-1]
        loss = loss_of(student(x)) + loss_of(other(x * 0.5)) + (student(x)[-1] * teacher_out).sum()
        loss.backward()
        assert all(p.grad is None for p in ema.parameters())
    build = lambda: nn.ModuleList([resnet(seed=1), resnet(seed=2)])  # noqa: E731
    (_, ref), (_, got) = run_both(build, step, per_layer)
    assert_same_grads(ref, got, REL[torch.float64])


def small_net(dtype=torch.float64) -> nn.Module:
    """Every generator kind (7x7 stacked, 3x3 twice, 1x1) with BNs, in eval-free training mode."""
    torch.manual_seed(0)
    layers = [OREPAConv2d(3, 8, 7, padding=3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
              OREPAConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
              OREPAConv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), OREPAConv2d(8, 4, 1)]
    net = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('branch_scales'):
                p.uniform_(0.5, 1.5)
    return net.train()


def test_nothing_of_a_dropped_model_stays_alive(capture):
    """A generation whose kernels not every member took (here the second conv
    skips a forward) must not keep itself, its virtual generator and the
    packed parameters alive through the autograd graph once the model is gone."""
    import weakref

    from orepa_mm.layers import batched_generation
    model = nn.Sequential(*(OREPAConv2d(6, 6, 3, padding=1) for _ in range(2))).double()
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    model[0](x).sum()  # a forward of one member, no backward
    generation = weakref.ref(batched_generation._group_of(model[0].branches).generation)
    assert generation() is not None and generation().kernels is not None
    del model
    batched_generation._GROUPS.clear()
    gc.collect()
    assert generation() is None


def test_a_recording_dies_with_its_model():
    """A recording holds the packed storage it reads; the groups live for the
    whole process, so a member's death must drop it (else a dropped model's
    parameters would stay alive in the group)."""
    import weakref
    set_generation_capture('simulate')
    try:
        model = nn.Sequential(*(OREPAConv2d(5, 5, 3, padding=1) for _ in range(2))).double()
        model(torch.randn(1, 5, 8, 8, dtype=torch.float64)).sum().backward()
        group = batched_generation._group_of(model[0].branches)
        assert group.captured is not None and group.captured.generation is not None
        storage = weakref.ref(group.captured.storage['weight_origin'])
        del model
        gc.collect()
        assert group.captured is None and storage() is None
    finally:
        set_generation_capture('off')


def test_bf16_autocast(per_layer, capture, device):
    x = torch.randn(4, 3, 16, 16)

    def step(model: nn.Module) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
        loss_of(out).backward()
        return out
    (ref_out, ref), (out, got) = run_both(lambda: small_net(torch.float32), step, per_layer)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in got.values())
    # Both run their convs in bf16 from float32 kernels that differ in the
    # last float32 bits, so a few kernel entries round to neighbouring bf16
    # values: a few bf16 ULPs (2^-8 each) apart.
    assert rel(ref_out.float(), out.float()) <= 3e-2
    assert_same_grads(ref, got, 5e-2)


def test_fp16_autocast_with_grad_scaler(per_layer, capture, device):
    """fp16 autocast and a GradScaler (what AmpOptimWrapper does on CUDA)."""
    if device.type == 'cpu' and not (CPU_FLOAT16 and hasattr(torch.amp, 'GradScaler')):
        pytest.skip(f'torch {torch.__version__} has no float16 CPU kernels or no CPU GradScaler')
    x = torch.randn(4, 3, 16, 16)

    def step(model: nn.Module) -> torch.Tensor:
        scaler = grad_scaler(device.type, init_scale=8.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with torch.autocast(device.type, dtype=torch.float16):
            out = model(x)
        scaler.scale(loss_of(out)).backward()
        scaler.unscale_(opt)
        found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
        assert found_inf == 0
        return out
    (ref_out, ref), (out, got) = run_both(lambda: small_net(torch.float32), step, per_layer)
    assert out.dtype == torch.float16
    assert rel(ref_out.float(), out.float()) <= 5e-3
    assert_same_grads(ref, got, 2e-2)


def test_kernels_are_generated_in_float32_under_autocast(device):
    from orepa_mm.layers.batched_generation import training_kernel
    net = small_net(torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        kernels = [training_kernel(m.branches) for m in net if isinstance(m, OREPAConv2d)]
    assert all(k.dtype == torch.float32 and k.requires_grad for k in kernels)
    for m, k in zip((m for m in net if isinstance(m, OREPAConv2d)), kernels):
        assert rel(m.branches.reference_kernel().detach(), k.detach()) <= 1e-6


def test_fuse_and_eval_after_training_steps(capture):
    model = resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for _ in range(2):
        loss_of(model(x)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    fused = orepa_mm.fuse_model(model)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert rel(a, b) <= REL[torch.float64]


def test_dtype_change_between_steps(per_layer, capture):
    """``.float()`` after packing: the next step packs again in the new dtype."""
    x = torch.randn(2, 3, 32, 32)

    def step(model: nn.Module) -> None:
        loss_of(model(x.double())).backward()
        model.zero_grad()
        model.float()
        loss_of(model(x)).backward()
    (_, ref), (_, got) = run_both(resnet, step, per_layer)
    assert_same_grads(ref, got, REL[torch.float32])


def test_torch_compile_matches_eager(device):
    """``torch.compile`` of a model with OREPA layers (mmengine's ``compile=True``)."""
    model = small_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eager_out = model(x)
    loss_of(eager_out).backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    out = compiled(x)
    loss_of(out).backward()
    assert rel(eager_out, out) <= 1e-9
    assert_same_grads(eager, grads(model), 1e-9)


# -- replayed generation ------------------------------------------------------------------
def test_replayed_steps_with_accumulation_match_per_layer(per_layer, capture):
    """Several optimizer steps of two accumulated micro-batches each: every
    generation after the first replays into the same fixed buffers."""
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]

    def steps(model: nn.Module) -> torch.Tensor:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            for x in xs:
                loss_of(model(x)).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        for x in xs:
            loss_of(model(x)).backward()
        return model(xs[0])[-1]
    (ref_out, ref), (out, got) = run_both(resnet, steps, per_layer)
    assert rel(ref_out, out) <= REL[torch.float64]
    assert_same_grads(ref, got, REL[torch.float64])


def test_replay_never_overwrites_kernels_that_a_pending_backward_needs(per_layer, capture):
    """Two forwards, then one backward, on a ResNet-50 (1x1 blocks): a 1x1
    conv keeps only its input, so its kernel is gone before the second
    forward, which generates again while the first generation's backward is
    pending; that backward takes the kernels from the first generation.  A
    replay for the second forward would overwrite them in the fixed buffer."""
    x1, x2 = (torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2))

    recorded = []

    def step(model: nn.Module) -> None:
        for _ in range(2):  # the first step records (simulate), the second replays
            model.zero_grad(set_to_none=True)
            (loss_of(model(x1)) + 2 * loss_of(model(x2))).backward()
        # (while the model lives: a member's death drops its group's recording)
        recorded.append(any(g.captured is not None and g.captured.generation is not None
                            for g in batched_generation._GROUPS.values()))
    (_, ref), (_, got) = run_both(lambda: resnet(50), step, per_layer)
    assert_same_grads(ref, got, REL[torch.float64])
    if capture != 'off':
        assert any(recorded), 'nothing was replayed'


def test_capture_mode_is_checked() -> None:
    with pytest.raises(ValueError, match='choose one of'):
        set_generation_capture('graphs')


# -- the operator count -----------------------------------------------------------------
def test_operators_per_step_do_not_grow_with_depth():
    """ResNet-50 (53 OREPA layers in about 20 shape groups): the step's
    operator count is a bounded multiple of the plain model's, and the same
    at two input sizes."""
    torch.manual_seed(0)
    plain = SlimResNet(depth=50, base_channels=8)
    orepa = SlimResNet(depth=50, base_channels=8, conv_cfg=dict(type='OREPA'))
    plain.train()
    orepa.train()
    n_plain, n_orepa = ops_per_step(plain, 32), ops_per_step(orepa, 32)
    assert ops_per_step(orepa, 48) == n_orepa
    REPORT['operators per ResNet-50 training step, plain / OREPA'] = f'{n_plain} / {n_orepa} ({n_orepa / n_plain:.2f}x)'
    assert n_orepa / n_plain <= 2.5, f'{n_orepa} vs {n_plain} operators per step'


# -- which kernels are kept for backward ------------------------------------------------
@pytest.mark.parametrize('batch,kept', [(8, True), (1, False)])
def test_large_1x1_kernels_are_kept_at_large_batches(per_layer, batch: int, kept: bool) -> None:
    """A 1x1 group keeps its kernels when they are small beside its members'
    inputs and costly to generate, else generates them again in backward;
    both are the per-layer definition's step, and what is kept is counted."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(OREPAConv2d(256, 256, 1, bias=False), nn.ReLU(), OREPAConv2d(256, 256, 1, bias=False))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, OREPAConv2d):
                    m.branches.branch_scales.uniform_(0.5, 1.5)
        return model.double().train()
    batched_generation._GROUPS.clear()  # no member of an earlier test's model
    x = torch.randn(batch, 256, 16, 16, dtype=torch.float64)
    model = build()
    loss_of(model(x)).backward()  # the first step forms the group
    model.zero_grad(set_to_none=True)
    with counters.SavedTensorCounter(lambda: counters.model_tensors(model)) as counter:
        out = model(x)
    group = batched_generation._group_of(model[0].branches)
    assert group.generation.regenerate_in_backward is not kept
    activations = 2 * batch * 256 * 16 * 16 * 8  # the two convs' inputs (x, the ReLU's output)
    kernels = 2 * 256 * 256 * 8
    assert counter.nbytes == activations + (kernels if kept else 0)
    loss_of(out).backward()
    got = grads(model)
    per_layer()
    reference = build()
    loss_of(reference(x)).backward()
    assert_same_grads(grads(reference), got, REL[torch.float64])


# -- DDP ---------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, rendezvous: str, path: str, device_type: str, capture: str) -> None:
    import datetime

    import torch.distributed as dist

    # Loopback only, a file rendezvous (no port to collide on) and a short
    # timeout: a sandbox whose hostname resolves to an unreachable address must
    # fail this test quickly instead of hanging the suite.
    os.environ['GLOO_SOCKET_IFNAME'] = 'lo'
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', init_method=f'file://{rendezvous}',
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    use_device_in_worker(device_type, rank)
    set_generation_capture(capture)
    model = nn.parallel.DistributedDataParallel(resnet(), device_ids=[rank] if device_type == 'cuda' else None)
    x = _ddp_inputs(world).to(device_type)
    for _ in range(2):  # the second step replays what the first recorded (capture on)
        model.zero_grad(set_to_none=True)
        loss_of(model(x[2 * rank:2 * rank + 2])).backward()
    if rank == 0:
        torch.save({k: v.cpu() for k, v in grads(model.module).items()}, path)
    dist.barrier()
    # Leave without running destructors: tearing down DDP's reducer and the
    # gloo group at interpreter exit can deadlock (the group's worker thread
    # waits for the GIL that the destructor holds); seen in about one run in
    # a few under load.
    os._exit(0)


def use_device_in_worker(device_type: str, rank: int) -> None:
    """In a spawned worker, the device as the ``device`` fixture sets it up: on
    CUDA the rank's card, TF32 off, new tensors there; one intra-op thread."""
    torch.set_num_threads(1)
    if device_type == 'cuda':
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_default_device('cuda')


def _ddp_inputs(world: int) -> torch.Tensor:
    return torch.randn(2 * world, 3, 32, 32, dtype=torch.float64, device='cpu',
                       generator=torch.Generator().manual_seed(0))


def run_workers(worker, args: tuple, nprocs: int) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; kill any left when one fails."""
    workers = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method='spawn')
    try:
        while not workers.join():
            pass
    finally:
        for proc in workers.processes:
            if proc.is_alive():
                proc.kill()


@pytest.mark.timeout(300)
def test_ddp_matches_one_process(tmp_path, per_layer, device, capture):
    """DDP's averaged gradients equal the per-layer definition's over the
    whole batch: two processes over gloo on the CPU; on CUDA one process over
    nccl (one card), which still runs DDP's reducer and its gradient hooks."""
    world = 1 if device.type == 'cuda' else 2
    path = str(tmp_path / 'ddp_grads.pt')
    run_workers(_ddp_worker, (world, str(tmp_path / 'rendezvous'), path, device.type, capture), nprocs=world)
    got = torch.load(path)
    per_layer()
    model = resnet()
    x = _ddp_inputs(world).to(device)
    parts = []
    for i in range(world):
        model.zero_grad(set_to_none=True)
        loss_of(model(x[2 * i:2 * i + 2])).backward()
        parts.append(grads(model))
    expected = {k: sum(part[k] for part in parts).cpu() / world for k in parts[0]}
    assert_same_grads(expected, got, 1e-9)

