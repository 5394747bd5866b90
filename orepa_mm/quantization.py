"""What INT8 quantization does to a fused model's kernels: per-layer
statistics of the conv weights that predict trouble before deploying.

Per-channel symmetric INT8 (the usual weight scheme of TensorRT and ONNX
Runtime) gives each output channel a step of ``max|w_c| / 127``: a channel
whose largest weight sits far above the rest of its weights (an outlier)
spends its 255 levels on that one value, and the rest round coarsely.
Re-parameterized kernels are sums of branches, which can make such outliers
(the centre tap of a k x k kernel collects the 1x1, the identity and the
average branches).  For each conv this module reports:

* ``outlier_ratio``: the largest ``max|w_c| / std(w_c)`` over the output
  channels (about 3 to 4 for a Gaussian channel of a 3x3 conv; large values
  mean coarse steps for the other weights of that channel);
* ``channel_range_ratio``: ``max_c max|w_c|`` over the median channel's, how
  unequal the channels are (what per-tensor quantization would suffer);
* ``int8_weight_error``: ``||w - q(w)|| / ||w||`` for per-channel symmetric
  INT8 rounding ``q``, the weight error the quantizer will make.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

__all__ = ['conv_weight_statistics', 'int8_per_channel']


def int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to symmetric per-output-channel INT8 and back."""
    w = weight.detach().double().flatten(1)
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float64).tiny)
    return (torch.round(w / scale).clamp(-127, 127) * scale).view_as(weight)


@torch.no_grad()
def conv_weight_statistics(model: nn.Module) -> List[Dict[str, Any]]:
    """One record per ``nn.Conv2d`` of ``model`` (module order): name, shape
    and the statistics of the module docstring."""
    records = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        w = module.weight.detach().double()
        flat = w.flatten(1)
        absmax = flat.abs().amax(1)
        std = flat.std(1, unbiased=False) if flat.shape[1] > 1 else flat.abs().squeeze(1)
        ratio = absmax / std.clamp_min(torch.finfo(torch.float64).tiny)
        worst = int(ratio.argmax())
        norm = w.norm().item()
        records.append(dict(
            layer=name, shape=list(w.shape),
            outlier_ratio=ratio[worst].item(), outlier_channel=worst,
            channel_range_ratio=(absmax.max() / absmax.median().clamp_min(1e-300)).item(),
            int8_weight_error=((w - int8_per_channel(w)).norm().item() / norm) if norm > 0 else 0.0))
    return records
