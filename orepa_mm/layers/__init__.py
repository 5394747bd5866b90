"""Re-parameterizable conv layers, one module per family."""
from .base import ConstantBuffers, ReparamConv2d
from .dbb import DBBConv2d, dbb_conv
from .feature_path import feature_path_report
from .generation_capture import set_generation_capture
from .orepa import (
    LARGE_KERNEL_THRESHOLD,
    KernelGenerator,
    OREPA1x1Branches,
    OREPAConv2d,
    OREPAKxKBranches,
    OREPAStackedBranches,
    branch_kind,
    build_branches,
)

__all__ = ['ReparamConv2d', 'ConstantBuffers', 'OREPAConv2d', 'DBBConv2d', 'dbb_conv', 'KernelGenerator',
           'OREPA1x1Branches', 'OREPAKxKBranches', 'OREPAStackedBranches', 'LARGE_KERNEL_THRESHOLD', 'branch_kind',
           'build_branches', 'set_generation_capture', 'feature_path_report']
