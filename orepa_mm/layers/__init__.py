"""Re-parameterizable conv layers, one module per family."""
from .base import ReparamConv2d
from .dbb import DBBConv2d
from .orepa import OREPA1x1Branches, OREPAConv2d, OREPAKxKBranches, OREPAStackedBranches

__all__ = ['ReparamConv2d', 'OREPAConv2d', 'DBBConv2d', 'OREPA1x1Branches', 'OREPAKxKBranches',
           'OREPAStackedBranches']
