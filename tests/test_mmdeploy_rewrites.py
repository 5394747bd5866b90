"""The pieces of the mmdeploy path that need no mmdeploy: adaptive average
pooling as two matrix products (what the export uses for PSPNet's pyramid
pooling) against PyTorch's own, float64; and the one place that chooses the
TorchScript ONNX exporter for code that calls ``torch.onnx.export`` itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from orepa_mm import compat
from orepa_mm.mmdeploy_rewrites import adaptive_avg_pool2d_by_matmul, pooling_matrix


@pytest.mark.core
@pytest.mark.parametrize('size', [(16, 32), (17, 5), (6, 6), (1, 9), (128, 256)])
@pytest.mark.parametrize('output_size', [1, 2, 3, 6, (4, 7), (None, 3)])
def test_adaptive_pooling_by_matmul_equals_pytorchs(size, output_size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    want = F.adaptive_avg_pool2d(x, output_size)
    got = adaptive_avg_pool2d_by_matmul(x, output_size)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-14


@pytest.mark.core
def test_pooling_matrix_rows_are_pytorchs_bins():
    """16 inputs into 6 bins: floor(i * 16 / 6) to ceil((i + 1) * 16 / 6), overlapping."""
    m = pooling_matrix(16, 6, torch.empty(0, dtype=torch.float64))
    bins = [tuple(row.nonzero().flatten().tolist()) for row in m]
    assert bins[0] == (0, 1, 2) and bins[1] == (2, 3, 4, 5) and bins[-1] == (13, 14, 15)
    assert torch.allclose(m.sum(1), torch.ones(6, dtype=torch.float64))


def test_torchscript_exporter_is_chosen_inside_the_block_and_restored(tmp_path):
    pytest.importorskip('onnx')
    torch_export = torch.onnx.export
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)).eval()
    with compat.torchscript_onnx_exporter():
        assert torch.onnx.export is not torch_export
        import torch.onnx.symbolic_opset9 as opset9
        assert hasattr(opset9, '_cast_Long')  # what mmdeploy 1.3.1's RoIAlign symbolic imports
        # A call as a library makes it, without dynamo=: the TorchScript exporter on every torch.
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / 'm.onnx'), input_names=['input'],
                          dynamic_axes={'input': {0: 'batch'}}, opset_version=11)
    assert torch.onnx.export is torch_export
    import onnx
    graph = onnx.load(str(tmp_path / 'm.onnx')).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
