"""Weight statistics that predict INT8 trouble (``orepa_mm.quantization``), on kernels whose answer is known."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from numerics import _one_thread, _seed  # noqa: F401  (autouse fixtures)
from orepa_mm.quantization import conv_weight_statistics, int8_per_channel

pytestmark = pytest.mark.core


def test_int8_rounding_is_exact_on_the_grid_and_bounded_off_it() -> None:
    steps = torch.tensor([[-127.0, -3.0, 0.0, 5.0, 127.0], [-127.0, 1.0, 2.0, 30.0, 60.0]])  # each reaches 127
    scales = torch.tensor([[0.01], [0.5]])
    on_grid = steps.double() * scales.double()
    assert torch.allclose(int8_per_channel(on_grid), on_grid, rtol=1e-12, atol=0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    step = w.flatten(1).abs().amax(1) / 127
    err = (int8_per_channel(w) - w).flatten(1).abs().amax(1)
    assert (err <= step / 2 + 1e-15).all()


def test_an_outlier_is_found_in_its_channel() -> None:
    conv = nn.Conv2d(4, 6, 3, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        conv.weight.normal_()
        before = conv_weight_statistics(model)[0]
        conv.weight[4, 1, 1, 1] = 40.0
    records = conv_weight_statistics(model)
    assert [r['layer'] for r in records] == ['0', '2']
    r = records[0]
    assert r['outlier_channel'] == 4 and r['outlier_ratio'] > 1.5 * before['outlier_ratio']  # <= sqrt(36)
    assert r['channel_range_ratio'] > 5 and r['int8_weight_error'] > 2 * before['int8_weight_error']
    w = conv.weight.detach().double()
    assert r['int8_weight_error'] == pytest.approx(((w - int8_per_channel(w)).norm() / w.norm()).item())
