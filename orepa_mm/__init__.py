"""orepa_mm: online convolutional re-parameterization (OREPA) for OpenMMLab.

Importing the package (configs do it with ``custom_imports``):

* registers the ``OREPA`` and ``DBB`` conv layers for ``conv_cfg``, and the
  ``OREPAResNet``/``DBBResNet`` backbones into every installed framework
  (mmdet, mmseg, mmpretrain);
* registers ``BranchSimilarityHook`` into mmengine's ``HOOKS``;
* allowlists the globals of mmengine checkpoints for
  ``torch.load(weights_only=True)`` (see :mod:`orepa_mm.checkpoint`).

Public API: :class:`OREPAConv2d`, :class:`DBBConv2d`, :func:`fuse_model`,
:func:`fuse_model_with_report` (:class:`FuseReport`),
:func:`set_generation_capture` (replayed kernel generation, e.g. CUDA graphs),
:func:`feature_path_report` (which branches a training step ran on the feature map)
and the kernel algebra in :mod:`orepa_mm.kernels`.
"""
from . import kernels
from .checkpoint import install_safe_globals
from .engine import BranchSimilarityHook
from .fuse import FuseReport, count_reparam_layers, fuse_model, fuse_model_with_report
from .layers import DBBConv2d, OREPAConv2d, ReparamConv2d, feature_path_report, set_generation_capture
from .models.backbones import register_backbones
from .registry import register_conv_layers
from .version import __version__

install_safe_globals()
register_conv_layers()
register_backbones()

__all__ = ['__version__', 'kernels', 'OREPAConv2d', 'DBBConv2d', 'ReparamConv2d', 'set_generation_capture',
           'feature_path_report', 'fuse_model', 'fuse_model_with_report', 'FuseReport', 'count_reparam_layers',
           'BranchSimilarityHook']
