"""The benchmarked workloads: a model family, how each variant is built, its
synthetic batch, its loss and its inference.

Workloads (:data:`WORKLOADS`): ``resnet18``/``resnet50`` (mmdet ``ResNet``,
``DBBResNet``, ``OREPAResNet`` backbones), ``faster-rcnn`` and ``pspnet`` (the
repository's mmdet/mmseg configs), ``tv-faster-rcnn`` (torchvision's Faster
R-CNN R50-FPN with its backbone convs swapped, for machines without mmcv's
compiled ops), ``toy-fcos`` (the demo's toy detector, configs/toy; use it
at its own 160x160).

Variants (:data:`VARIANTS`): ``plain``, ``dbb`` (the paper's DBB baseline:
DBB layers for the k x k convs, 1x1 convs and the stem plain), ``orepa``
(every conv an OREPA layer) and ``orepa-kernel`` (the same model with
``feature_path='never'``: every branch folded into the kernel, one conv per
training forward, as before the feature-map choice existed).
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from torch import Tensor

REPO = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

VARIANTS = ('plain', 'dbb', 'orepa', 'orepa-kernel')
#: Variants measured unless the command line says otherwise.
DEFAULT_VARIANTS = ('plain', 'dbb', 'orepa')
WORKLOADS = ('resnet18', 'resnet50', 'faster-rcnn', 'pspnet', 'tv-faster-rcnn', 'toy-fcos')
RESNET_TYPES = {'plain': 'ResNet', 'dbb': 'DBBResNet', 'orepa': 'OREPAResNet'}
DET_CONFIG = 'configs/mmdet/faster-rcnn_r50-{variant}_fpn_1x_coco.py'
TOY_DET_CONFIG = 'configs/toy/fcos_r18w32-{variant}_fpn_600i_toy-coco.py'
SEG_CONFIG = 'configs/mmseg/pspnet_r50-d8-{variant}_4xb2-80k_cityscapes-512x1024.py'


# ---------------------------------------------------------------------------
# torchvision's conv swap
# ---------------------------------------------------------------------------
def swap_convs(module: nn.Module, variant: str) -> int:
    """Replace the ``nn.Conv2d`` s under ``module`` by the variant's layers
    (OREPA: every conv; DBB: the k x k convs, as ``conv_cfg=dict(type='DBB')`` decides),
    keeping each conv's arguments and ``requires_grad``; return how many
    were replaced."""
    from orepa_mm import OREPAConv2d
    from orepa_mm.layers import dbb_conv
    if variant == 'plain':
        return 0
    build = {'orepa': OREPAConv2d, 'dbb': dbb_conv}[variant]
    count = 0
    for name, child in module.named_children():
        if type(child) is not nn.Conv2d:
            count += swap_convs(child, variant)
            continue
        layer = build(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                      child.dilation, child.groups, child.bias is not None)
        if type(layer) is not nn.Conv2d:
            layer.requires_grad_(child.weight.requires_grad)
            setattr(module, name, layer)
            count += 1
    return count


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------
def build_variant(workload: 'Workload', variant: str) -> nn.Module:
    """``workload``'s model of ``variant``: ``orepa-kernel`` is the ``orepa``
    model with every OREPA layer's ``feature_path`` set to ``'never'``."""
    if variant != 'orepa-kernel':
        return workload.build(variant)
    from orepa_mm import OREPAConv2d
    model = workload.build('orepa')
    for module in model.modules():
        if isinstance(module, OREPAConv2d):
            module.feature_path = 'never'
    return model


def describe_variant(workload: 'Workload', variant: str) -> str:
    """What :func:`build_variant` builds, for the metadata."""
    if variant != 'orepa-kernel':
        return workload.describe(variant)
    return f"{workload.describe('orepa')}, feature_path='never'"


class Workload:
    """One benchmarked model: builds each variant and runs it on a fixed batch."""

    name = ''
    #: state_dict prefix of the part that differs between variants.
    backbone_prefix = ''

    def __init__(self, batch_size: int, input_size: Tuple[int, int], device: torch.device, seed: int) -> None:
        self.batch_size, self.input_size, self.device, self.seed = batch_size, input_size, device, seed
        gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(batch_size, 3, *input_size, generator=gen).to(device)
        self._make_samples(gen)

    def _make_samples(self, gen: torch.Generator) -> None:
        """Create the synthetic data samples (none for a bare backbone)."""

    def build(self, variant: str) -> nn.Module:
        """The model of ``variant``, on the CPU, with random weights."""
        raise NotImplementedError

    def loss(self, model: nn.Module) -> Tensor:
        """The scalar training loss of ``model`` on the batch."""
        raise NotImplementedError

    def predict(self, model: nn.Module) -> Any:
        """The evaluation forward of ``model`` on the batch."""
        raise NotImplementedError

    def features(self, model: nn.Module) -> Any:
        """The backbone (and neck) forward, used to calibrate BatchNorm statistics."""
        return model(self.inputs)

    def stats(self, model: nn.Module, outputs: Any = None) -> Dict[str, int]:
        """Size of the data-dependent work of the last forward (none for a backbone)."""
        return {}

    def describe(self, variant: str) -> str:
        """What was built, for the metadata."""
        return ''


class ResNetWorkload(Workload):
    """An mmdet ResNet backbone; loss = sum over stages of the mean square of the output."""

    def __init__(self, depth: int, *args: Any) -> None:
        self.depth = depth
        self.name = f'resnet{depth}'
        super().__init__(*args)

    def _cfg(self, variant: str) -> dict:
        cfg = dict(type=RESNET_TYPES[variant], depth=self.depth, norm_eval=False, frozen_stages=-1, init_cfg=None)
        return cfg

    def build(self, variant: str) -> nn.Module:
        from mmdet.registry import MODELS
        return MODELS.build(self._cfg(variant))

    def loss(self, model: nn.Module) -> Tensor:
        return sum(out.float().pow(2).mean() for out in model(self.inputs))

    def predict(self, model: nn.Module) -> Any:
        return model(self.inputs)

    def describe(self, variant: str) -> str:
        return f'mmdet {self._cfg(variant)}'


def load_workload_config(path: str) -> Config:
    """The config at ``path``, its framework (``default_scope``) registered.

    The one place where this tool reads a config: it defers to the library's
    loader, :func:`orepa_mm.config.load_config`.
    """
    from orepa_mm.config import load_config
    return load_config(path)


def _replace_type(cfg: Any, old: str, new: str) -> None:
    """Replace ``type=old`` by ``type=new`` everywhere in a nested config."""
    if isinstance(cfg, dict):
        if cfg.get('type') == old:
            cfg['type'] = new
        for value in cfg.values():
            _replace_type(value, old, new)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            _replace_type(value, old, new)


class _ConfigWorkload(Workload):
    """A detector or segmentor built from one of the repository's configs."""

    backbone_prefix = 'backbone.'
    config_template = ''

    def config_path(self, variant: str) -> str:
        """The repository config of ``variant``."""
        return osp.join(REPO, self.config_template.format(variant=variant))

    def model_cfg(self, variant: str) -> Any:
        """The config's ``model`` with random backbone weights (no download)."""
        cfg = load_workload_config(self.config_path(variant))
        cfg.model.backbone.init_cfg = None
        return cfg

    def build(self, variant: str) -> nn.Module:
        from mmengine.registry import DefaultScope

        from orepa_mm.config import model_registry
        cfg = self.model_cfg(variant)
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            return model_registry(cfg.default_scope).build(cfg.model)

    def _metainfo(self) -> dict:
        shape = tuple(self.input_size)
        return dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                    scale_factor=(1.0, 1.0), flip=False, flip_direction=None)

    def loss(self, model: nn.Module) -> Tensor:
        losses = model(self.inputs, self.train_samples, mode='loss')
        return model.parse_losses(losses)[0]

    def predict(self, model: nn.Module) -> Any:
        return model(self.inputs, self.eval_samples(), mode='predict')

    def eval_samples(self) -> list:
        """Data samples without annotations, for the evaluation forward."""
        raise NotImplementedError

    def features(self, model: nn.Module) -> Any:
        return model.extract_feat(self.inputs)

    def describe(self, variant: str) -> str:
        backbone = self.model_cfg(variant).model.backbone
        return f'{osp.relpath(self.config_path(variant), REPO)} (backbone {backbone.type}, ' \
               f'frozen_stages={backbone.get("frozen_stages")}, norm_eval={backbone.get("norm_eval")})'


def random_boxes(num: int, input_size: Tuple[int, int], gen: torch.Generator) -> Tensor:
    """``num`` random ``(x1, y1, x2, y2)`` boxes, 10-30% of the image per side."""
    h, w = input_size
    xy = torch.rand(num, 2, generator=gen) * 0.7
    wh = 0.1 + torch.rand(num, 2, generator=gen) * 0.2
    return torch.cat([xy, xy + wh], dim=1) * torch.tensor([w, h, w, h], dtype=torch.float32)


def _record_rois(module: nn.Module, inputs: tuple, output: Tensor) -> None:
    """Forward hook of the RoI extractor: remember how many RoIs it pooled."""
    module.last_num_rois = int(inputs[1].shape[0])


class FasterRCNNWorkload(_ConfigWorkload):
    """Faster R-CNN R50-FPN (configs/mmdet); 3 random gt boxes per image, 80 classes."""

    name = 'faster-rcnn'
    config_template = DET_CONFIG
    num_boxes = 3
    num_classes = 80

    def build(self, variant: str) -> nn.Module:
        model = super().build(variant)
        model.roi_head.bbox_roi_extractor.register_forward_hook(_record_rois)
        return model

    def stats(self, model: nn.Module, outputs: Any = None) -> Dict[str, int]:
        out = dict(rois=getattr(model.roi_head.bbox_roi_extractor, 'last_num_rois', -1))
        if outputs is not None:
            out['detections'] = sum(len(sample.pred_instances) for sample in outputs)
        return out

    def _make_samples(self, gen: torch.Generator) -> None:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        self.train_samples = []
        for _ in range(self.batch_size):
            sample = DetDataSample(metainfo=self._metainfo())
            sample.gt_instances = InstanceData(
                bboxes=random_boxes(self.num_boxes, self.input_size, gen).to(self.device),
                labels=torch.randint(0, self.num_classes, (self.num_boxes, ), generator=gen).to(self.device))
            self.train_samples.append(sample)

    def eval_samples(self) -> list:
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=self._metainfo()) for _ in range(self.batch_size)]


class ToyFCOSWorkload(FasterRCNNWorkload):
    """The demo's toy FCOS R18w32-FPN (configs/toy), 3 classes; 3 random gt boxes per image."""

    name = 'toy-fcos'
    config_template = TOY_DET_CONFIG
    num_classes = 3

    def build(self, variant: str) -> nn.Module:
        return _ConfigWorkload.build(self, variant)

    def stats(self, model: nn.Module, outputs: Any = None) -> Dict[str, int]:
        return {} if outputs is None else dict(detections=sum(len(sample.pred_instances) for sample in outputs))


class PSPNetWorkload(_ConfigWorkload):
    """PSPNet R50-D8 (configs/mmseg), SyncBN replaced by BN; random 19-class label maps."""

    name = 'pspnet'
    config_template = SEG_CONFIG
    num_classes = 19

    def model_cfg(self, variant: str) -> Any:
        cfg = super().model_cfg(variant)
        _replace_type(cfg.model, 'SyncBN', 'BN')
        cfg.model.pretrained = None
        return cfg

    def _make_samples(self, gen: torch.Generator) -> None:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        self.train_samples = []
        for _ in range(self.batch_size):
            sample = SegDataSample(metainfo=self._metainfo())
            labels = torch.randint(0, self.num_classes, (1, *self.input_size), generator=gen)
            sample.gt_sem_seg = PixelData(data=labels.to(self.device))
            self.train_samples.append(sample)

    def eval_samples(self) -> list:
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=self._metainfo()) for _ in range(self.batch_size)]


class TorchvisionFasterRCNNWorkload(Workload):
    """torchvision's Faster R-CNN R50-FPN (``fasterrcnn_resnet50_fpn``, random
    weights, 91 classes, its own resize to 800-1333), every backbone conv
    swapped for the variant's layer (:func:`swap_convs`).  Needs only torch,
    torchvision and mmengine, not mmcv's compiled ops: it is the detector
    this tool can run on a machine where mmcv cannot be built.  Batch norms
    train (torchvision's choice without pretrained weights); 3 random gt
    boxes per image."""

    name = 'tv-faster-rcnn'
    backbone_prefix = 'backbone.body.'
    num_boxes = 3

    def _make_samples(self, gen: torch.Generator) -> None:
        self.images = list(self.inputs.unbind(0))
        self.targets = [dict(boxes=random_boxes(self.num_boxes, self.input_size, gen).to(self.device),
                             labels=torch.randint(1, 91, (self.num_boxes, ), generator=gen).to(self.device))
                        for _ in range(self.batch_size)]

    def build(self, variant: str) -> nn.Module:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
        self.swapped = swap_convs(model.backbone.body, variant)
        return model

    def loss(self, model: nn.Module) -> Tensor:
        return sum(model(self.images, self.targets).values())

    def predict(self, model: nn.Module) -> Any:
        return model(self.images)

    def features(self, model: nn.Module) -> Any:
        images, _ = model.transform(self.images)
        return model.backbone(images.tensors)

    def stats(self, model: nn.Module, outputs: Any = None) -> Dict[str, int]:
        return {} if outputs is None else dict(detections=sum(len(o['boxes']) for o in outputs))

    def describe(self, variant: str) -> str:
        return f'torchvision fasterrcnn_resnet50_fpn, {variant} backbone convs'


def make_workload(name: str, batch_size: int, input_size: Tuple[int, int], device: torch.device,
                  seed: int) -> Workload:
    """The :class:`Workload` called ``name`` (one of :data:`WORKLOADS`)."""
    args = (batch_size, input_size, device, seed)
    if name in ('resnet18', 'resnet50'):
        return ResNetWorkload(int(name[len('resnet'):]), *args)
    if name == 'faster-rcnn':
        return FasterRCNNWorkload(*args)
    if name == 'pspnet':
        return PSPNetWorkload(*args)
    if name == 'tv-faster-rcnn':
        return TorchvisionFasterRCNNWorkload(*args)
    if name == 'toy-fcos':
        return ToyFCOSWorkload(*args)
    raise ValueError(f'unknown workload {name!r}; choose from {WORKLOADS}')
