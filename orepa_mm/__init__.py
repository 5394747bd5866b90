"""orepa_mm: online convolutional re-parameterization for OpenMMLab."""
from .version import __version__

__all__ = ['__version__']
