"""The layers' constant buffers follow the parameters' dtype and device.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from numerics import LAYER_CLASSES, _one_thread, _seed, assert_rel_close, prior_basis  # noqa: F401  (_one_thread, _seed: autouse fixtures)
from orepa_mm.layers import DBBConv2d, ReparamConv2d


# -- constants of the layers follow the module's dtype ---------------------------
def layer_constants(layer: ReparamConv2d) -> List[Tuple[str, Tensor, Optional[Tensor]]]:
    """(name, buffer, value from the formula in float64) of each non-trivial constant."""
    out, k = layer.out_channels, layer.kernel_size[0]
    box = torch.full((k, k), 1.0 / k ** 2, dtype=torch.float64)
    if isinstance(layer, DBBConv2d):
        return [('avg_window', layer.avg_window, box.expand(out, 1, k, k))]
    patterns = layer.branches.spatial_patterns.view(out, 3, k, k)
    return [('box', patterns[:, 0], box.expand(out, k, k)),
            ('prior', patterns[:, 1], prior_basis(out, k, torch.float64))]


@pytest.mark.parametrize('cls', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_constants_are_exact_after_double(cls: type) -> None:
    """After ``.double()`` the box (1/k^2) and frequency-prior constants hold
    their float64 values, not float32 values cast up: otherwise a float64
    layer is not average pooling / the prior filter to float64 precision."""
    layer = cls(4, 6, 3, padding=1).double()
    for name, buf, exact in layer_constants(layer):
        assert buf.dtype == torch.float64
        assert_rel_close(buf, exact, 1e-15, f'{cls.__name__} {name}')
