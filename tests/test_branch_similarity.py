"""Branch similarity (``orepa_mm.branch_similarity``): the cosine matrix of
a layer's branch contributions, on layers whose answer is known."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from numerics import _one_thread, _seed  # noqa: F401  (autouse fixtures)
from orepa_mm.branch_similarity import branch_cosine_matrix, layer_similarities, mean_similarity
from orepa_mm.layers import OREPAConv2d

pytestmark = pytest.mark.core


def test_equal_and_opposite_branches() -> None:
    """Origin set to the centred 1x1 branch's kernel: cosine 1; negated: -1."""
    layer = OREPAConv2d(4, 6, 3, padding=1, branches=('origin', '1x1', 'dws')).double()
    with torch.no_grad():
        layer.branches.branch_scales.fill_(1.0)
        layer.branches.weight_origin.zero_()[:, :, 1, 1] = layer.branches.weight_1x1
    result = branch_cosine_matrix(layer)
    assert result['branches'] == ['origin', '1x1', 'dws']
    m = torch.tensor(result['matrix'])
    assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype))
    assert m[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        layer.branches.branch_scales[0].fill_(-2.0)  # scales count: the contributions are compared
    assert branch_cosine_matrix(layer)['matrix'][0][1] == pytest.approx(-1.0, abs=1e-12)


def test_records_follow_module_order_and_skip_single_branch_layers() -> None:
    model = nn.Sequential(OREPAConv2d(3, 4, 3, padding=1), OREPAConv2d(4, 4, 3, padding=1, branches=('origin', )),
                          nn.ReLU(), OREPAConv2d(4, 8, 1), OREPAConv2d(8, 8, 7, padding=3, scaling='none'))
    records = layer_similarities(model)
    assert [r['layer'] for r in records] == ['0', '3', '4']
    assert [len(r['branches']) for r in records] == [6, 2, 2]
    for r in records:
        n = len(r['branches'])
        pairs = [r['matrix'][i][j] for i in range(n) for j in range(i + 1, n)]
        assert r['mean_cosine'] == pytest.approx(sum(pairs) / len(pairs))
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in pairs)
    assert mean_similarity(records) == pytest.approx(sum(r['mean_cosine'] for r in records) / 3)
    assert mean_similarity([]) is None
