"""How alike the branches of OREPA blocks are: the paper's branch-similarity
analysis (without the scaling layers, branches drift towards one another and
the block degrades towards a single branch).

For a layer, each branch's contribution to the squeezed kernel
(:meth:`~orepa_mm.layers.kernel_generator.KernelGenerator.branch_kernels`,
scales applied) is flattened and compared with every other branch's by cosine
similarity.  A layer with one branch has no pair and is skipped.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import OREPAConv2d

__all__ = ['branch_cosine_matrix', 'layer_similarities', 'mean_similarity']


@torch.no_grad()
def branch_cosine_matrix(layer: OREPAConv2d) -> Dict[str, Any]:
    """``{'branches': names, 'matrix': cosine similarities}`` of ``layer``'s branch contributions (float64)."""
    kernels = layer.branches.branch_kernels()
    names = list(kernels)
    flat = torch.stack([k.detach().double().flatten() for k in kernels.values()])
    unit = F.normalize(flat, dim=1)
    return {'branches': names, 'matrix': (unit @ unit.T).tolist()}


def layer_similarities(model: nn.Module) -> List[Dict[str, Any]]:
    """One record per OREPA layer with two or more branches, in module order
    (about the network's depth): its name, kernel size, branches, cosine
    matrix and ``mean_cosine`` (the mean over branch pairs)."""
    records = []
    for name, module in model.named_modules():
        if not isinstance(module, OREPAConv2d) or len(module.branches.branch_names) < 2:
            continue
        record = dict(layer=name, kernel_size=module.kernel_size[0], **branch_cosine_matrix(module))
        n = len(record['branches'])
        pairs = [record['matrix'][i][j] for i in range(n) for j in range(i + 1, n)]
        record['mean_cosine'] = sum(pairs) / len(pairs)
        records.append(record)
    return records


def mean_similarity(records: List[Dict[str, Any]]) -> Optional[float]:
    """The mean of the layers' ``mean_cosine`` (None without layers)."""
    return sum(r['mean_cosine'] for r in records) / len(records) if records else None
