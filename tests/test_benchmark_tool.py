"""Tests for tools/analysis_tools/benchmark.py: the saved-tensor and operator counters, the conv swaps,
and a tiny end-to-end run of the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'analysis_tools' / 'benchmark.py'
sys.path.insert(0, str(SCRIPT.parent))

from benchmark_lib import counters, workloads  # noqa: E402
from benchmark_lib.measure import Trainee  # noqa: E402

FLOAT_BYTES = 4


def _conv_relu_stack() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())


def test_counter_counts_inputs_once_and_excludes_parameters() -> None:
    model = _conv_relu_stack()
    x = torch.randn(2, 3, 8, 8)
    with counters.SavedTensorCounter(counters.model_tensors(model)) as counter:
        y = model(x)
    # conv1 keeps its input x; ReLU keeps its output, which conv2 keeps as its
    # input too (one storage); the last ReLU keeps its output.  The conv
    # weights are saved as well, but they are parameters: excluded.
    expected = (2 * 3 * 8 * 8 + 2 * 4 * 8 * 8 + 2 * 5 * 4 * 4) * FLOAT_BYTES
    assert counter.nbytes == expected
    assert counter.num_storages == 3
    y.sum().backward()  # the graph is intact

    with counters.SavedTensorCounter() as everything:
        y = model(x)
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Conv2d)) * FLOAT_BYTES
    assert everything.nbytes == expected + weights


def test_counter_skips_graphs_dropped_before_backward() -> None:
    model = _conv_relu_stack()
    x = torch.randn(1, 3, 8, 8)
    with counters.SavedTensorCounter(model.parameters()) as counter:
        model(x)  # output (and graph) discarded at once
    assert counter.nbytes == 0
    nbytes, out = counters.count_saved_bytes(lambda: model(x), model.parameters())
    assert nbytes == (3 * 8 * 8 + 4 * 8 * 8 + 5 * 4 * 4) * FLOAT_BYTES
    assert out.shape == (1, 5, 4, 4)


def test_counter_ignores_no_grad() -> None:
    model = _conv_relu_stack()
    with torch.no_grad(), counters.SavedTensorCounter(model.parameters()) as counter:
        y = model(torch.randn(1, 3, 8, 8))
    assert counter.nbytes == 0 and not y.requires_grad


def test_swap_convs_replaces_each_variants_convs() -> None:
    """The tv-faster-rcnn workload's conv swap: every conv for OREPA, the 3x3
    ones for DBB (the paper's baseline), nothing for plain; arguments and
    frozen flags kept."""
    from orepa_mm import DBBConv2d, OREPAConv2d

    def body() -> nn.Sequential:
        frozen = nn.Conv2d(3, 8, 7, 2, 3, bias=False).requires_grad_(False)
        return nn.Sequential(frozen, nn.Sequential(nn.Conv2d(8, 8, 3, 1, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 1)))

    expected = {'plain': (nn.Conv2d, nn.Conv2d, nn.Conv2d), 'orepa': (OREPAConv2d,) * 3,
                'dbb': (nn.Conv2d, DBBConv2d, nn.Conv2d)}
    for variant, types in expected.items():
        model = body()
        before = [(m.kernel_size, m.stride, m.padding, m.dilation, m.in_channels, m.out_channels)
                  for m in (model[0], model[1][0], model[1][2])]
        count = workloads.swap_convs(model, variant)
        convs = (model[0], model[1][0], model[1][2])
        assert tuple(type(m) for m in convs) == types, variant
        assert count == sum(t is not nn.Conv2d for t in types), variant
        assert [(m.kernel_size, m.stride, m.padding, m.dilation, m.in_channels, m.out_channels)
                for m in convs] == before, variant
        assert not any(p.requires_grad for p in model[0].parameters()), variant
        assert all(p.requires_grad for p in model[1].parameters()), variant


def test_view_ops_are_told_apart_by_schema() -> None:
    aten = torch.ops.aten
    for op in (aten.view.default, aten.t.default, aten.expand.default, aten.detach.default, aten.select.int,
               aten.as_strided.default, aten.permute.default):
        assert counters.is_view_op(op), op
    for op in (aten.add.Tensor, aten.add_.Tensor, aten.mm.default, aten.convolution.default, aten.copy_.default,
               aten.mm.out, aten._foreach_mul_.Scalar, aten.clone.default):
        assert not counters.is_view_op(op), op


def test_op_counter_counts_forward_backward_and_optimizer() -> None:
    model = _conv_relu_stack()
    x = torch.randn(2, 3, 8, 8)
    with counters.OpCounter() as forward_only:
        model(x)
    with counters.OpCounter() as step:
        model(x).sum().backward()
    assert 0 < forward_only.total < step.total
    assert forward_only.by_op['convolution'] == 2 and step.by_op['convolution_backward'] == 2
    assert 'view' not in step.by_op and 't' not in step.by_op  # views and aliases apart
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    optimizer.step()  # creates the momentum buffers
    counter, _ = counters.count_ops(optimizer.step)
    assert counter.total > 0 and all(op.startswith('_foreach_') for op in counter.by_op), counter.by_op


def _resnet18_step_ops(variant: str, size: int) -> counters.OpCounter:
    """The operators of the benchmark's training step of ResNet-18 at ``size`` x ``size`` (after a first step)."""
    workload = workloads.make_workload('resnet18', 2, (size, size), torch.device('cpu'), 0)
    torch.manual_seed(0)
    model = workloads.build_variant(workload, variant)
    model.train()  # (mmdet's ResNet.train() returns None)
    trainee = Trainee(workload, variant, model, amp=False, lr=0.0)
    trainee.train_step()  # the momentum buffers
    counter, _ = counters.count_ops(trainee.train_step)
    return counter


@pytest.fixture
def one_thread():
    """torch on one thread: far faster than two contended ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_op_count_of_a_training_step_is_exact_and_size_independent(one_thread) -> None:
    import orepa_mm  # noqa: F401 - registers OREPAResNet
    plain_small, plain_large = _resnet18_step_ops('plain', 32), _resnet18_step_ops('plain', 64)
    assert plain_small.total > 0
    assert plain_small.by_op == plain_large.by_op and plain_small.views == plain_large.views
    # Every branch in the kernel: the count does not depend on the input.
    orepa_small, orepa_large = _resnet18_step_ops('orepa-kernel', 32), _resnet18_step_ops('orepa-kernel', 48)
    assert orepa_small.by_op == orepa_large.by_op
    assert orepa_small.total > plain_small.total
    # The default form depends on the input through the feature-map choice only, and exactly.
    assert _resnet18_step_ops('orepa', 48).by_op == _resnet18_step_ops('orepa', 48).by_op
    # one foreach SGD update for all parameters, not one per parameter
    assert plain_small.by_op['_foreach_add_'] <= 3


def test_cli_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), '--models', 'resnet18', '--variants', 'plain', 'orepa', 'dbb',
           '--batch-size', '1', '--input-size', '64', '64', '--rounds', '1', '--warmup', '1', '--device', 'cpu',
           '--threads', '1', '--out-dir', str(tmp_path)]  # one thread: robust to other work on a shared CPU
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    stem = tmp_path / 'benchmark_resnet18_1x64x64'
    report = json.loads(stem.with_suffix('.json').read_text())
    assert {'date', 'command', 'device', 'device_name', 'torch_threads', 'versions'} <= set(report['metadata'])
    assert report['config']['variants'] == ['plain', 'orepa', 'dbb']
    res = report['results']['resnet18']
    assert res['baseline'] == 'plain'
    for variant in ('plain', 'orepa', 'dbb'):
        result = res['variants'][variant]
        for key in ('train_step_s', 'eval_unfused_s', 'eval_fused_s'):
            assert result[key]['median'] > 0 and len(result[key]['all']) == 1
        for key in ('saved_activation_bytes', 'param_bytes', 'grad_bytes', 'optimizer_state_bytes',
                    'param_grad_optimizer_bytes', 'params'):
            assert result[key] > 0
        assert result['cuda_max_allocated_bytes'] is None  # CPU run
        assert result['train_ops'] == sum(result['train_ops_by_op'].values()) > 0
        assert result['fused_reparam_layers'] == 0
    assert res['variants']['plain']['reparam_layers'] == 0
    # OREPA converts every conv of ResNet-18 (20), DBB its 3x3 convs (16).
    assert res['variants']['orepa']['reparam_layers'] == 20
    assert res['variants']['dbb']['reparam_layers'] == 16
    for key in ('train_step_s', 'saved_activation_bytes', 'param_grad_optimizer_bytes', 'eval_unfused_s',
                'eval_fused_s', 'params', 'train_ops'):
        assert res['ratios']['plain'][key] == 1.0
    # DBB runs every branch on the feature map: more activations than plain;
    # OREPA keeps each conv's input, like plain, plus its generated k x k
    # kernels (the 1x1 ones are generated again in backward) and the stem's
    # 3x3 factors: less than the plain model's conv weights more.
    from mmdet.models.backbones import ResNet
    weight_bytes = sum(p.numel() * FLOAT_BYTES for p in ResNet(depth=18).parameters() if p.dim() == 4)
    acts = {v: res['variants'][v]['saved_activation_bytes'] for v in ('plain', 'orepa', 'dbb')}
    assert acts['dbb'] > acts['plain']
    assert acts['plain'] < acts['orepa'] < acts['plain'] + weight_bytes
    assert res['ratios']['dbb']['saved_activation_bytes'] == pytest.approx(acts['dbb'] / acts['plain'])
    # OREPA's step adds the kernel generation's matrix products (and their
    # recomputation) to the convolutions; DBB runs more convolutions.
    flops = {v: res['variants'][v]['train_gflop'] for v in ('plain', 'orepa', 'dbb')}
    assert flops['orepa'] > flops['plain'] > 0 and flops['dbb'] > flops['plain']
    assert 'bmm' in res['variants']['orepa']['train_gflop_by_op']
    assert 'bmm' not in res['variants']['plain']['train_gflop_by_op']
    # OREPA generates its kernels with extra operators at every step: more dispatches than plain
    ops = {v: res['variants'][v]['train_ops'] for v in ('plain', 'orepa', 'dbb')}
    assert ops['orepa'] > ops['plain'] and ops['dbb'] > ops['plain']
    assert res['ratios']['orepa']['train_ops'] == pytest.approx(ops['orepa'] / ops['plain'])

    md = stem.with_suffix('.md').read_text()
    assert '| resnet18 | orepa |' in md and '(1.00x)' in md and 'GFLOP per training step' in md
    assert 'ops/step' in md and 'ATen operators per training step' in md
    png = stem.with_suffix('.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Bad arguments: exit status 2, one message, nothing written; --help documents it."""
    proc = subprocess.run([sys.executable, str(SCRIPT), '--workloads', 'resnet7', '--out-dir', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'benchmark: error:' in proc.stderr and 'resnet7' in proc.stderr
    assert not any(tmp_path.iterdir())

    import benchmark
    for args in (['--models', 'resnet18', '--variants', 'plain', 'plain'], ['--models', 'pspnet', '--batch-size', '1'],
                 ['--rounds', '0']):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.parse_args(args)
        assert exit_info.value.code == 2, args
        assert 'benchmark: error:' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--help'])
    help_text = capsys.readouterr().out
    assert 'exit status' in help_text and '--models' in help_text and '--workloads' in help_text
    assert benchmark.parse_args(['--models', 'resnet18']).workloads == ['resnet18']


def _synthetic_points(batches, plain, extra_orepa, extra_dbb, pixels=100):
    def variants(w):
        return {'plain': dict(train_step_s=plain(w)), 'orepa': dict(train_step_s=plain(w) + extra_orepa(w)),
                'dbb': dict(train_step_s=plain(w) + extra_dbb(w))}
    return [dict(batch=b, input_size=[10, 10], work=b * pixels, variants=variants(b * pixels)) for b in batches]


def test_sweep_fit_recovers_the_cost_model_and_its_crossings() -> None:
    """plain = 10 + 0.01 w, OREPA's extra = 5 + 0.0005 w, DBB's = 0.003 w (w: images x pixels):
    OREPA <= 1.10x plain from w = (5 - 1) / (0.001 - 0.0005) = 8000, i.e. batch 80 at 100 px;
    OREPA <= DBB from w = 5 / 0.0025 = 2000, batch 20."""
    from benchmark_lib import sweep
    points = _synthetic_points([1, 2, 4, 8, 16], lambda w: 10 + 0.01 * w, lambda w: 5 + 0.0005 * w,
                               lambda w: 0.003 * w)
    fitted = sweep.fit(points)
    assert fitted['model']['plain']['fixed_s'] == pytest.approx(10) and fitted['model']['plain']['per_work_s'] == \
        pytest.approx(0.01)
    assert fitted['model']['orepa']['extra_fixed_s'] == pytest.approx(5)
    assert fitted['model']['orepa']['extra_per_work_s'] == pytest.approx(0.0005)
    assert fitted['crossings']['orepa_at_1.10x_plain'] == dict(work=pytest.approx(8000), batch=80)
    assert fitted['crossings']['orepa_at_most_dbb'] == dict(work=pytest.approx(2000), batch=20)
    # An extra time that grows faster than 10% of plain's never reaches 1.10x.
    never = sweep.fit(_synthetic_points([1, 2, 4], lambda w: 10 + 0.01 * w, lambda w: 5 + 0.002 * w,
                                        lambda w: 0.003 * w))
    assert never['crossings']['orepa_at_1.10x_plain'] == dict(work=None, batch=None)


def test_cli_sweep_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), '--workloads', 'resnet18', '--variants', 'plain', 'dbb', 'orepa', '--sweep',
           '--batch-sizes', '2', '3', '--input-sizes', '64', '--rounds', '1', '--warmup', '1', '--device', 'cpu',
           '--threads', '1', '--out-dir', str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'sweep_resnet18_64.json').read_text())
    assert [p['batch'] for p in report['points']] == [2, 3]
    assert [p['work'] for p in report['points']] == [2 * 64 * 64, 3 * 64 * 64]
    for p in report['points']:
        for variant in ('plain', 'dbb', 'orepa'):
            assert p['variants'][variant]['train_step_s'] > 0 and p['variants'][variant]['train_gflop'] > 0
    assert {'plain', 'dbb', 'orepa'} == set(report['fit']['model'])
    assert 'OREPA costs no more than DBB' in proc.stdout and 'orepa extra time' in proc.stdout
    assert '| batch | input | work (Mpx) |' in (tmp_path / 'sweep_resnet18_64.md').read_text()
    assert (tmp_path / 'sweep_resnet18_64.png').read_bytes()[:4] == b'\x89PNG'
