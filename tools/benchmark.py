"""Training and inference cost of plain, DBB and OREPA models, measured in one process.

    python tools/benchmark.py --models resnet50 --variants plain dbb orepa \\
        --batch-size 2 --input-size 512 512 --rounds 5 --warmup 1 --out-dir benchmark_results

For every model (``resnet18``, ``resnet50``: mmdet ``ResNet``/``DBBResNet``/
``OREPAResNet`` backbones; ``faster-rcnn``: the Faster R-CNN R50-FPN configs
of ``configs/mmdet``; ``pspnet``: the PSPNet R50-D8 configs of
``configs/mmseg``; ``tv-faster-rcnn``: torchvision's Faster R-CNN R50-FPN with
the backbone convs swapped, for machines where mmcv's compiled ops cannot be
built) and every variant it measures:

* training step time: forward, backward, SGD-with-momentum step (median over
  rounds; the variants alternate inside each round, so that the drift of a
  shared, noisy machine hits them alike);
* activation memory: the bytes autograd keeps for backward, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks`, each storage once,
  storages of parameters and buffers excluded (they exist anyway): exact and
  independent of the device; on CUDA also the peak of
  ``torch.cuda.max_memory_allocated`` during a step, above what was allocated
  before it;
* the convolution and matrix-product FLOPs of one training step, counted
  with :class:`torch.utils.flop_counter.FlopCounterMode`, in total and by
  operator (the floor under the step-time ratio: OREPA adds the GEMMs of its
  kernel generation, the recomputation in backward included);
* parameter, gradient and optimizer-state bytes;
* evaluation forward time (no_grad, eval mode) of the unfused model and of
  the model after :func:`orepa_mm.fuse_model`.

Each figure is also given as a ratio to the first variant (``plain`` by
default).  Results go to ``<out-dir>/benchmark_<models>_<batch>x<h>x<w>``
``.json`` (with metadata: versions, device, threads, command line, date),
``.md`` and ``.png`` (a bar chart of the ratios; skipped, with a note, when
matplotlib is missing).

``--profile VARIANT`` instead runs :mod:`torch.profiler` over a few training
steps of that variant of the first model and prints (and saves) the top
operators by self CPU time.

Synthetic data: a seeded random batch per model, shared by all variants;
detection samples carry 3 random gt boxes and labels, segmentation samples a
random label map.  The model's data preprocessor is bypassed (the inputs are
already "normalised").  Weights: random (no pretrained download); every
variant is built after seeding the same generator, the parts outside the
backbone (neck, heads) are then copied from the first variant, and every
BatchNorm's statistics are calibrated on the batch, so that each variant
feeds the heads normalised features and a detector's data-dependent work
(proposals, RoIs, detections; recorded under ``workload`` in the JSON) is
alike.  The learning rate is 0 by default: the optimizer does all its work
but the weights, and so that work, stay the same in every round.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import os.path as osp
import platform
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without orepa_mm installed
    sys.path.insert(0, REPO)

VARIANTS = ('plain', 'dbb', 'orepa', 'dbb-kxk')
#: Variants measured unless --variants says otherwise.
DEFAULT_VARIANTS = ('plain', 'dbb', 'orepa')
#: conv_cfg type of the 'dbb-kxk' variant (registered by :func:`register_dbb_kxk`).
DBB_KXK = 'BenchmarkDBBkxk'
MODELS = ('resnet18', 'resnet50', 'faster-rcnn', 'pspnet', 'tv-faster-rcnn')
RESNET_TYPES = {'plain': 'ResNet', 'dbb': 'DBBResNet', 'orepa': 'OREPAResNet', 'dbb-kxk': 'ResNet'}
DET_CONFIG = 'configs/mmdet/faster-rcnn_r50-{variant}_fpn_1x_coco.py'
SEG_CONFIG = 'configs/mmseg/pspnet_r50-d8-{variant}_4xb2-80k_cityscapes-512x1024.py'

#: Metrics reported as ratios, in table order: (key, column title, kind).
METRICS = (
    ('train_step_s', 'train step', 'time'),
    ('train_gflop', 'train GFLOP', 'gflop'),
    ('saved_activation_bytes', 'saved for backward', 'bytes'),
    ('cuda_max_allocated_bytes', 'CUDA step peak', 'bytes'),
    ('param_grad_optimizer_bytes', 'params+grads+optim', 'bytes'),
    ('eval_unfused_s', 'eval (unfused)', 'time'),
    ('eval_fused_s', 'eval (fused)', 'time'),
)


# ---------------------------------------------------------------------------
# Counting the bytes kept for backward
# ---------------------------------------------------------------------------
def _storage_key(t: Tensor) -> Tuple[str, int]:
    """Identity of the memory block behind ``t`` (views share it)."""
    return str(t.device), t.untyped_storage().data_ptr()


class SavedTensorCounter:
    """Context manager counting the bytes autograd saves for backward.

    Every tensor that autograd saves while the context is active is recorded
    (weakly: the counter keeps nothing alive).  On exit, the storages of the
    saved tensors that a graph still holds (graphs dropped before backward do
    not count) are counted once each (views, and tensors saved by several
    nodes, share one storage), at their full size.  Storages of the tensors
    in ``exclude`` (the model's parameters and buffers: they exist whether or
    not a graph is built) are left out.  The count depends only on the model,
    the input and the dtypes, not on the device or the allocator.

    Read :attr:`nbytes` / :attr:`num_storages` after the ``with`` block,
    while the output (and so the graph) is still alive::

        with SavedTensorCounter(model.parameters()) as counter:
            loss = model(x).sum()
        print(counter.nbytes)
        loss.backward()
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._saved: List[weakref.ReferenceType] = []
        self._hooks: Optional[contextlib.AbstractContextManager] = None
        self.nbytes = 0
        self.num_storages = 0

    def _pack(self, t: Tensor) -> Tensor:
        # What is returned here is what the graph holds, so a weak reference
        # to it is alive exactly as long as the graph node that saved it.
        # Trainable leaves (parameters) are returned as they are: custom
        # Functions may differentiate with respect to them (OREPA's backward
        # does).  Anything else is returned as a detached alias (same
        # storage): a node saving its own output would otherwise form a
        # reference cycle through ``grad_fn`` that keeps a dropped graph, and
        # an input the caller holds would look "kept" after its graph is gone.
        packed = t if t.requires_grad and t.is_leaf else t.detach()
        self._saved.append(weakref.ref(packed))
        return packed

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> 'SavedTensorCounter':
        self._saved.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        storages: Dict[Tuple[str, int], int] = {}
        for ref in self._saved:
            t = ref()
            if t is None:  # its graph was dropped before backward: not kept
                continue
            try:
                key, size = _storage_key(t), t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # no plain storage (sparse, wrapper subclasses)
                key, size = ('id', id(t)), t.numel() * t.element_size()
            if key not in self._excluded:
                storages[key] = size
        self._saved.clear()
        self.nbytes = sum(storages.values())
        self.num_storages = len(storages)


def count_saved_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> Tuple[int, Any]:
    """Run ``fn()`` under a :class:`SavedTensorCounter`; return (bytes, fn's result)."""
    with SavedTensorCounter(exclude) as counter:
        out = fn()
    return counter.nbytes, out


def model_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Parameters and buffers of ``model`` (their storages exist anyway)."""
    yield from model.parameters()
    yield from model.buffers()


# ---------------------------------------------------------------------------
# Workloads: a model family, its synthetic batch, its loss and its inference
# ---------------------------------------------------------------------------
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
        raise NotImplementedError

    def loss(self, model: nn.Module) -> Tensor:
        raise NotImplementedError

    def predict(self, model: nn.Module) -> Any:
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
        if variant == 'dbb-kxk':
            cfg['conv_cfg'] = dict(type=DBB_KXK)
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
    scope = ''
    config_template = ''

    def config_path(self, variant: str) -> str:
        """The repository config of ``variant`` ('dbb-kxk': the plain one, given a conv_cfg)."""
        return osp.join(REPO, self.config_template.format(variant='plain' if variant == 'dbb-kxk' else variant))

    def model_cfg(self, variant: str) -> Any:
        from mmengine.config import Config
        cfg = Config.fromfile(self.config_path(variant))
        cfg.model.backbone.init_cfg = None  # random weights, no download
        if variant == 'dbb-kxk':
            cfg.model.backbone.conv_cfg = dict(type=DBB_KXK)
        return cfg.model

    def build(self, variant: str) -> nn.Module:
        from mmengine.registry import DefaultScope
        importlib.import_module(f'{self.scope}.utils').register_all_modules(init_default_scope=False)
        registry = importlib.import_module(f'{self.scope}.registry').MODELS
        cfg = self.model_cfg(variant)
        with DefaultScope.overwrite_default_scope(self.scope):
            return registry.build(cfg)

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
        raise NotImplementedError

    def features(self, model: nn.Module) -> Any:
        return model.extract_feat(self.inputs)

    def describe(self, variant: str) -> str:
        backbone = self.model_cfg(variant).backbone
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
    scope = 'mmdet'
    config_template = DET_CONFIG
    num_boxes = 3


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
                labels=torch.randint(0, 80, (self.num_boxes, ), generator=gen).to(self.device))
            self.train_samples.append(sample)

    def eval_samples(self) -> list:
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=self._metainfo()) for _ in range(self.batch_size)]


class PSPNetWorkload(_ConfigWorkload):
    """PSPNet R50-D8 (configs/mmseg), SyncBN replaced by BN; random 19-class label maps."""

    name = 'pspnet'
    scope = 'mmseg'
    config_template = SEG_CONFIG
    num_classes = 19

    def model_cfg(self, variant: str) -> Any:
        cfg = super().model_cfg(variant)
        _replace_type(cfg, 'SyncBN', 'BN')
        cfg.pretrained = None
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


def dbb_kxk_conv(in_channels: int, out_channels: int, kernel_size: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """conv_cfg builder of the 'dbb-kxk' variant: a DBB layer for ``1 < k < 7``,
    a plain ``nn.Conv2d`` otherwise.  This is the DBB baseline of the paper
    (the reference code's ``choose_blk`` keeps 1x1 convs and the 7x7 stem
    plain), whereas orepa_mm's ``DBBResNet`` makes every conv a DBB layer."""
    from orepa_mm import DBBConv2d
    size = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
    cls = DBBConv2d if 1 < size < 7 else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, *args, **kwargs)


def register_dbb_kxk() -> None:
    """Register :func:`dbb_kxk_conv` as conv type :data:`DBB_KXK` (mmengine's root MODELS)."""
    from mmengine.registry import MODELS as ROOT_MODELS
    if DBB_KXK not in ROOT_MODELS.module_dict:
        ROOT_MODELS.register_module(name=DBB_KXK, module=dbb_kxk_conv)


def swap_convs(module: nn.Module, variant: str) -> int:
    """Replace the ``nn.Conv2d`` s under ``module`` by the variant's layers
    (OREPA / DBB every conv, dbb-kxk as :func:`dbb_kxk_conv` decides),
    keeping each conv's arguments and ``requires_grad``; return how many
    were replaced."""
    from orepa_mm import DBBConv2d, OREPAConv2d
    if variant == 'plain':
        return 0
    build = {'orepa': OREPAConv2d, 'dbb': DBBConv2d, 'dbb-kxk': dbb_kxk_conv}[variant]
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
    """The :class:`Workload` called ``name`` (one of :data:`MODELS`)."""
    args = (batch_size, input_size, device, seed)
    if name in ('resnet18', 'resnet50'):
        return ResNetWorkload(int(name[len('resnet'):]), *args)
    if name == 'faster-rcnn':
        return FasterRCNNWorkload(*args)
    if name == 'pspnet':
        return PSPNetWorkload(*args)
    if name == 'tv-faster-rcnn':
        return TorchvisionFasterRCNNWorkload(*args)
    raise ValueError(f'unknown model {name!r}; choose from {MODELS}')


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, run: Callable[[], Any]) -> None:
    """Set every BatchNorm's running statistics to the statistics of ``run()``'s batch.

    Random weights give each variant different activation scales: the
    designed OREPA/DBB initialisations are not a plain conv's.  Where BNs run
    on running statistics (mmdet's ``norm_eval=True``, evaluation, fusing),
    the heads would then see features of very different magnitudes, and the
    data-dependent work of a detector (proposals surviving NMS, RoIs,
    detections above the score threshold) would differ between variants.
    Calibrated statistics make every variant's features normalised, as with
    pretrained weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    state = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
        m.train()
    run()
    for m, momentum, training in state:
        m.momentum = momentum
        m.train(training)


def share_weights(src: nn.Module, dst: nn.Module, skip_prefix: str) -> int:
    """Copy the entries of ``src``'s state_dict outside ``skip_prefix`` into
    ``dst`` where name and shape match; return how many were copied.  An
    empty ``skip_prefix`` (a bare backbone: nothing is shared) copies nothing."""
    if not skip_prefix:
        return 0
    dst_state = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items()
              if not k.startswith(skip_prefix) and k in dst_state and dst_state[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return len(shared)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
class Trainee:
    """One variant of one workload: the model, its optimizer and a train step."""

    def __init__(self, workload: Workload, variant: str, model: nn.Module, amp: bool, lr: float) -> None:
        self.workload, self.variant, self.model = workload, variant, model
        self.device = workload.device
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                         momentum=0.9, weight_decay=1e-4)
        self.amp_dtype = (torch.float16 if self.device.type == 'cuda' else torch.bfloat16) if amp else None
        self.scaler = torch.amp.GradScaler('cuda') if self.amp_dtype == torch.float16 else None
        self.last_loss = float('nan')

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self) -> Tensor:
        with self.autocast():
            return self.workload.loss(self.model)

    def backward_step(self, loss: Tensor) -> None:
        """Backward, optimizer step, then drop the gradients (set_to_none)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        torch.manual_seed(self.workload.seed)  # the same proposal sampling etc. for every variant
        loss = self.forward_loss()
        self.backward_step(loss)
        self.last_loss = loss.item()

    def memory_step(self) -> Dict[str, Optional[int]]:
        """A train step that counts the saved bytes (and the CUDA peak)."""
        cuda = self.device.type == 'cuda'
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        torch.manual_seed(self.workload.seed)
        with SavedTensorCounter(model_tensors(self.model)) as counter:
            loss = self.forward_loss()
        self.backward_step(loss)
        self.last_loss = loss.item()
        out: Dict[str, Optional[int]] = dict(saved_activation_bytes=counter.nbytes,
                                              saved_storages=counter.num_storages, cuda_max_allocated_bytes=None)
        if cuda:
            torch.cuda.synchronize(self.device)
            out['cuda_max_allocated_bytes'] = torch.cuda.max_memory_allocated(self.device) - base
        return out

    def flop_step(self) -> Dict[str, Any]:
        """A train step under ``FlopCounterMode``: the GEMM and convolution
        FLOPs (forward, backward, and for OREPA its kernel generation and
        recomputation), in total and by operator."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.train_step()
        by_op = {str(op).split('.')[1]: n / 1e9 for op, n in counter.get_flop_counts()['Global'].items()}
        return dict(train_gflop=counter.get_total_flops() / 1e9, train_gflop_by_op=by_op)

    def state_bytes(self) -> Dict[str, int]:
        """Parameters, gradients (of trainable parameters) and optimizer state, in bytes."""
        params = list(self.model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        optim_bytes = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
        return dict(params=sum(p.numel() for p in params),
                    trainable_params=sum(p.numel() for p in params if p.requires_grad),
                    param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_state_bytes=optim_bytes,
                    param_grad_optimizer_bytes=param_bytes + grad_bytes + optim_bytes)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``fn()`` (synchronising CUDA before and after)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def summary(values: Sequence[float]) -> Dict[str, Any]:
    return dict(median=statistics.median(values), min=min(values), max=max(values), all=list(values))


def progress(message: str) -> None:
    stamp = datetime.datetime.now().strftime('%H:%M:%S')
    print(f'[benchmark {stamp}] {message}', flush=True)


def build_trainees(workload: Workload, variants: Sequence[str], args: argparse.Namespace) -> List[Trainee]:
    """Build every variant with the same seed, share the non-backbone weights,
    calibrate the BatchNorm statistics (:func:`calibrate_batchnorm`)."""
    trainees: List[Trainee] = []
    for variant in variants:
        torch.manual_seed(args.seed)
        model = workload.build(variant)
        if trainees:
            share_weights(trainees[0].model, model, workload.backbone_prefix)
        model.to(workload.device)
        calibrate_batchnorm(model, lambda: workload.features(model))
        model.train()
        trainees.append(Trainee(workload, variant, model, args.amp, args.lr))
        progress(f'{workload.name}: built {variant} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M '
                 f'parameters)')
    return trainees


def benchmark_model(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """All measurements of one model, its variants alternating."""
    from orepa_mm import count_reparam_layers, fuse_model

    workload = make_workload(name, args.batch_size, tuple(args.input_size), device, args.seed)
    trainees = build_trainees(workload, args.variants, args)
    results: Dict[str, Dict[str, Any]] = {
        t.variant: dict(built=workload.describe(t.variant), reparam_layers=count_reparam_layers(t.model))
        for t in trainees}

    # Memory is measured in the last warm-up step, or in an extra untimed
    # step without one.  On CUDA not in the very first step: that one also
    # allocates the momentum buffers and the library workspaces.
    memory_in_warmup = args.warmup >= (2 if device.type == 'cuda' else 1)
    steps = args.warmup if memory_in_warmup else args.warmup + 1
    for w in range(steps):
        for t in trainees:
            if w < steps - 1:
                t.train_step()
                progress(f'{name} | warm-up {w + 1}/{args.warmup} | {t.variant} | train step done')
                continue
            results[t.variant].update(t.memory_step())
            results[t.variant].update(t.flop_step())
            results[t.variant]['workload'] = dict(train=workload.stats(t.model))
            r = results[t.variant]
            cuda = r['cuda_max_allocated_bytes']
            progress(f'{name} | memory step | {t.variant} | saved for backward '
                     f'{r["saved_activation_bytes"] / 1e6:.1f} MB, {r["train_gflop"]:.1f} GFLOP per step'
                     + ('' if cuda is None else f', CUDA step peak {cuda / 1e6:.1f} MB'))

    step_times: Dict[str, List[float]] = {t.variant: [] for t in trainees}
    for r in range(args.rounds):
        for t in trainees:
            seconds = timed(lambda: [t.train_step() for _ in range(args.iters)], device) / args.iters
            step_times[t.variant].append(seconds)
            progress(f'{name} | round {r + 1}/{args.rounds} | {t.variant} | train step {seconds:.4f} s '
                     f'(loss {t.last_loss:.4g})')
    for t in trainees:
        results[t.variant]['train_step_s'] = summary(step_times[t.variant])
        results[t.variant].update(t.state_bytes())
        results[t.variant]['final_loss'] = t.last_loss

    if not args.skip_eval:
        benchmark_eval(workload, trainees, results, args, fuse_model, count_reparam_layers)
    for t in trainees:  # free the memory before the next model
        t.model, t.optimizer = None, None
    return dict(baseline=args.variants[0], variants=results, ratios=ratios(results, args.variants[0]))


def benchmark_eval(workload: Workload, trainees: Sequence[Trainee], results: Dict[str, Dict[str, Any]],
                   args: argparse.Namespace, fuse_model: Callable, count_reparam_layers: Callable) -> None:
    """Eval-mode forward times (no_grad) before and after fusing, variants alternating."""
    device, name = workload.device, workload.name
    models: Dict[str, Dict[str, nn.Module]] = {}
    for t in trainees:
        t.model.eval()
        fused = fuse_model(t.model)
        fused.eval()  # (mmdet's ResNet.train() returns None: no chaining)
        results[t.variant]['fused_reparam_layers'] = count_reparam_layers(fused)
        models[t.variant] = dict(unfused=t.model, fused=fused)

    def forward(t: Trainee, model: nn.Module) -> Any:
        with torch.no_grad(), t.autocast():
            return workload.predict(model)

    for _ in range(max(args.warmup, 1)):  # at least once: OREPA builds its eval kernel cache here
        for t in trainees:
            for model in models[t.variant].values():
                forward(t, model)
    times = {t.variant: dict(unfused=[], fused=[]) for t in trainees}
    for r in range(args.rounds):
        for t in trainees:
            for kind, model in models[t.variant].items():
                seconds = timed(lambda: [forward(t, model) for _ in range(args.iters)], device) / args.iters
                times[t.variant][kind].append(seconds)
            progress(f'{name} | eval round {r + 1}/{args.rounds} | {t.variant} | unfused '
                     f'{times[t.variant]["unfused"][-1]:.4f} s, fused {times[t.variant]["fused"][-1]:.4f} s')
    for t in trainees:
        for kind, model in models[t.variant].items():
            results[t.variant]['workload'][f'eval_{kind}'] = workload.stats(model, forward(t, model))
        results[t.variant]['eval_unfused_s'] = summary(times[t.variant]['unfused'])
        results[t.variant]['eval_fused_s'] = summary(times[t.variant]['fused'])
        t.model.train()


def metric_value(result: Dict[str, Any], key: str) -> Optional[float]:
    """A metric's number: the median for timings, the value itself otherwise."""
    value = result.get(key)
    if isinstance(value, dict):
        value = value['median']
    return value


def ratios(results: Dict[str, Dict[str, Any]], baseline: str) -> Dict[str, Dict[str, Optional[float]]]:
    """Every metric of every variant divided by the baseline variant's."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    keys = [key for key, _, _ in METRICS] + ['params']
    for variant, result in results.items():
        out[variant] = {}
        for key in keys:
            value, base = metric_value(result, key), metric_value(results[baseline], key)
            out[variant][key] = None if value is None or not base else value / base
    return out


# ---------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------
def profile(args: argparse.Namespace, device: torch.device, stem: str) -> str:
    """Profile ``args.profile_steps`` training steps of one variant; return the table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, variant = args.models[0], args.profile
    workload = make_workload(name, args.batch_size, tuple(args.input_size), device, args.seed)
    trainee = build_trainees(workload, [variant], args)[0]
    for _ in range(max(args.warmup, 1)):
        trainee.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    progress(f'profiling {args.profile_steps} training steps of {name} {variant}')
    with torch_profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            trainee.train_step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
    events = prof.key_averages()
    table = events.table(sort_by='self_cpu_time_total', row_limit=args.profile_top)
    if device.type == 'cuda':  # the device-time key was renamed in torch 2.4
        key = 'self_device_time_total' if hasattr(events[0], 'self_device_time_total') else 'self_cuda_time_total'
        table += f'\n\nby {key}:\n' + events.table(sort_by=key, row_limit=args.profile_top)
    header = (f'# torch.profiler: {args.profile_steps} training steps of {name} ({variant}), batch '
              f'{args.batch_size}, input {args.input_size[0]}x{args.input_size[1]}, device {device}'
              f'{", AMP" if args.amp else ""}; top {args.profile_top} ops by self CPU time\n')
    os.makedirs(args.out_dir, exist_ok=True)
    path = osp.join(args.out_dir, f'profile_{name}_{variant}_{stem}.txt')
    with open(path, 'w') as f:
        f.write(header + table + '\n')
    print(header + table, flush=True)
    progress(f'wrote {path}')
    return table


# ---------------------------------------------------------------------------
# Metadata and reports
# ---------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the packages that matter here (None where missing)."""
    out: Dict[str, Optional[str]] = {}
    for module in ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'orepa_mm', 'numpy'):
        try:
            out[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is just not reported
            out[module] = None
    return out


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was (timings on a shared one are noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def metadata(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    meta: Dict[str, Any] = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        python=platform.python_version(), platform=platform.platform(), versions=package_versions(),
        git_commit=git_commit(), device=str(device), cpu=cpu_model(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), load_average_start=_load_average(), amp=(None if not args.amp else
                                                   'float16' if device.type == 'cuda' else 'bfloat16'))
    if device.type == 'cuda':
        meta['device_name'] = torch.cuda.get_device_name(device)
        meta['cuda'] = torch.version.cuda
    else:
        meta['device_name'] = meta['cpu']
    return meta


def fmt_value(value: Optional[float], kind: str) -> str:
    if value is None:
        return '-'
    if kind == 'time':
        return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.3f} s'
    if kind == 'bytes':
        return f'{value / 1e9:.2f} GB' if value >= 1e9 else f'{value / 1e6:.1f} MB'
    if kind == 'gflop':
        return f'{value:.1f}'
    return f'{value / 1e6:.2f}M'


def table_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the results table ("value (ratio x)" cells)."""
    cuda = report['metadata']['device'].startswith('cuda')
    metrics = [m for m in METRICS if cuda or m[0] != 'cuda_max_allocated_bytes']
    header = ['model', 'variant', 'params'] + [title for _, title, _ in metrics]
    rows = []
    for name, res in report['results'].items():
        for variant, result in res['variants'].items():
            ratio = res['ratios'][variant]
            row = [name, variant, f'{fmt_value(result["params"], "count")} ({ratio["params"]:.2f}x)']
            for key, _, kind in metrics:
                value = metric_value(result, key)
                row.append('-' if value is None else f'{fmt_value(value, kind)} ({ratio[key]:.2f}x)')
            rows.append(row)
    return header, rows


def comparisons(report: Dict[str, Any]) -> List[str]:
    """The paper's two claims, where plain, OREPA and a DBB variant were
    measured: OREPA's extra activation memory over plain relative to DBB's,
    and its training speed-up over DBB."""
    lines = []
    for name, res in report['results'].items():
        v = res['variants']
        for dbb in ('dbb', 'dbb-kxk'):
            if not all(k in v for k in ('plain', 'orepa', dbb)):
                continue
            act = {k: v[k]['saved_activation_bytes'] for k in ('plain', 'orepa', dbb)}
            step = {k: v[k]['train_step_s']['median'] for k in ('plain', 'orepa', dbb)}
            parts = []
            if act['orepa'] <= act['plain']:
                parts.append(f'OREPA keeps no more for backward than plain ({act["orepa"] / act["plain"]:.2f}x), '
                             f'{dbb} {act[dbb] / act["plain"]:.2f}x')
            elif act[dbb] > act['plain']:
                share = (act['orepa'] - act['plain']) / (act[dbb] - act['plain'])
                parts.append(f'OREPA needs {share:.0%} of {dbb}\'s extra activation memory over plain '
                             f'({1 - share:.0%} less)')
            parts.append(f'OREPA trains {step[dbb] / step["orepa"]:.2f}x as fast as {dbb}')
            lines.append(f'{name}: ' + '; '.join(parts))
    return lines


def workload_lines(report: Dict[str, Any]) -> List[str]:
    """The data-dependent work per variant (e.g. a detector's RoIs), where recorded."""
    lines = []
    for name, res in report['results'].items():
        parts = []
        for variant, result in res['variants'].items():
            phases = {phase: stats for phase, stats in result.get('workload', {}).items() if stats}
            if phases:
                parts.append(f'{variant}: ' + ', '.join(f'{phase} ' + ' '.join(f'{k}={v}' for k, v in stats.items())
                                                        for phase, stats in phases.items()))
        if parts:
            lines.append(f'{name} data-dependent work: ' + '; '.join(parts))
    return lines


def flop_lines(report: Dict[str, Any]) -> List[str]:
    """GEMM and convolution FLOPs of one training step by operator: the
    floor under the step-time ratio (OREPA's extra FLOPs are its kernel
    generation, the recomputation in backward included)."""
    lines = []
    for name, res in report['results'].items():
        parts = []
        for variant, result in res['variants'].items():
            by_op = result.get('train_gflop_by_op')
            if by_op:
                ops = ', '.join(f'{op} {gflop:.1f}' for op, gflop in sorted(by_op.items(), key=lambda kv: -kv[1]))
                parts.append(f'{variant} {result["train_gflop"]:.1f} ({ops})')
        if parts:
            lines.append(f'{name} GFLOP per training step: ' + '; '.join(parts))
    return lines


def text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: settings, the table, the derived comparisons."""
    meta, cfg = report['metadata'], report['config']
    header, rows = table_rows(report)
    h, w = cfg['input_size']
    base = cfg['variants'][0]
    lines = [
        f'# Benchmark: {", ".join(cfg["models"])}, batch {cfg["batch_size"]}, input {h}x{w}',
        '',
        f'- date: {meta["date"]}',
        f'- device: {meta["device"]} ({meta["device_name"]}), {meta["torch_threads"]} torch thread(s), '
        f'{meta["cpu_count"]} CPUs',
        f'- load average (1/5/15 min): {meta["load_average_start"]} at the start, {meta["load_average_end"]} '
        'at the end',
        f'- torch {meta["versions"]["torch"]}, AMP: {meta["amp"] or "off"}',
        f'- {cfg["rounds"]} round(s) (median), {cfg["warmup"]} warm-up, {cfg["iters"]} step(s) per timing, '
        f'variants alternating in one process; {cfg["optimizer"]}, lr {cfg["lr"]}',
        f'- command: `{meta["command"]}`',
        '',
        f'Each cell: value (ratio to {base}). "saved for backward": bytes autograd keeps for backward, each '
        'storage once, parameters and buffers excluded. "params+grads+optim": parameters, their gradients and '
        'the SGD momentum buffers. "train GFLOP": convolution and matrix-product FLOPs of one training step '
        '(torch.utils.flop_counter). Times: median seconds per training step / evaluation forward.',
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    extra = comparisons(report) + flop_lines(report) + workload_lines(report)
    if extra:
        lines += [''] + [f'- {line}' for line in extra]
    return '\n'.join(lines) + '\n'


def draw_chart(report: Dict[str, Any], path: str) -> bool:
    """Bar chart of the ratios, one panel per model; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cuda = report['metadata']['device'].startswith('cuda')
    metrics = [m for m in METRICS if cuda or m[0] != 'cuda_max_allocated_bytes']
    names = list(report['results'])
    variants = report['config']['variants']
    width_in = max(8.0, 2.0 + 0.45 * len(metrics) * len(variants))
    fig, axes = plt.subplots(len(names), 1, figsize=(width_in, 4.2 * len(names)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, name in zip(axes[:, 0], names):
        res = report['results'][name]
        for i, variant in enumerate(variants):
            values = [res['ratios'][variant][key] or 0.0 for key, _, _ in metrics]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=variant)
            for bar, value in zip(bars, values):
                ax.annotate(f'{value:.2f}', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha='center', va='bottom', fontsize=7)
        ax.axhline(1.0, color='gray', linestyle='--', linewidth=0.8)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([title for _, title, _ in metrics], fontsize=8)
        ax.set_ylabel(f'ratio to {res["baseline"]}')
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    cfg, meta = report['config'], report['metadata']
    fig.suptitle(f'batch {cfg["batch_size"]}, input {cfg["input_size"][0]}x{cfg["input_size"][1]}, '
                 f'{meta["device_name"]}{", AMP" if cfg["amp"] else ""}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['resnet50'], choices=MODELS, help='models to measure')
    parser.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help="the first one is the baseline of the ratios. dbb: orepa_mm's DBBResNet (every conv "
                        "a DBB layer); dbb-kxk: DBB layers for the 1 < k < 7 convs only, the paper's DBB baseline "
                        '(1x1 convs and the 7x7 stem plain)')
    parser.add_argument('--batch-size', type=int, default=2, help='images per step')
    parser.add_argument('--input-size', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                        help='input height and width')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds; the median is reported')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per variant first')
    parser.add_argument('--iters', type=int, default=1, help='steps per timing (their mean is one sample)')
    parser.add_argument('--out-dir', default='benchmark_results', help='where the JSON, Markdown and PNG go')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None,
                        help='None: cuda when available, else cpu')
    parser.add_argument('--amp', action='store_true', help='torch.autocast: bfloat16 on CPU, float16 on CUDA')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch.set_num_threads (None: torch's choice); 1 is far less sensitive to other "
                        'work on a shared CPU')
    parser.add_argument('--seed', type=int, default=0, help='seed of the weights and the synthetic data')
    parser.add_argument('--lr', type=float, default=0.0,
                        help='SGD learning rate (momentum 0.9). The default 0 does all the work of a step but keeps '
                        'the weights, so the data-dependent work of a detector (proposals, RoIs) stays that of '
                        'the calibrated initial weights in every round and variant, and nothing diverges')
    parser.add_argument('--skip-eval', action='store_true', help='skip the evaluation-forward timings')
    parser.add_argument('--profile', choices=VARIANTS, default=None,
                        help='instead of the benchmark, profile training steps of this variant of the first model')
    parser.add_argument('--profile-steps', type=int, default=3, help='profiled training steps')
    parser.add_argument('--profile-top', type=int, default=25, help='rows of the profile table')
    args = parser.parse_args(argv)
    if len(set(args.variants)) != len(args.variants) or len(set(args.models)) != len(args.models):
        parser.error('--models and --variants must not repeat')
    if min(args.rounds, args.iters, args.batch_size, args.profile_steps, *args.input_size) < 1 or args.warmup < 0:
        parser.error('--rounds, --iters, --batch-size, --input-size and --profile-steps must be >= 1, '
                     '--warmup >= 0')
    if 'pspnet' in args.models and args.batch_size < 2:
        parser.error('pspnet needs --batch-size >= 2: its pyramid pooling has a 1x1 bin followed by BN, '
                     'which cannot train on one value per channel')
    return args


def output_stem(args: argparse.Namespace, device: torch.device) -> str:
    h, w = args.input_size
    stem = f'{args.batch_size}x{h}x{w}'
    if device.type == 'cuda':
        stem += '_cuda'
    if args.amp:
        stem += '_amp'
    return stem


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.threads:
        torch.set_num_threads(args.threads)
    import orepa_mm  # noqa: F401 - registers the OREPA/DBB layers and backbones
    register_dbb_kxk()

    load = _load_average()
    if device.type == 'cpu' and load and load[0] >= (os.cpu_count() or 1):
        progress(f'note: the machine is busy (load average {load[0]} on {os.cpu_count()} CPUs); CPU timings '
                 f'with {torch.get_num_threads()} threads suffer badly from contention: consider --threads 1')
    stem = output_stem(args, device)
    if args.profile:
        profile(args, device, stem)
        return {}

    start = time.perf_counter()
    report: Dict[str, Any] = dict(metadata=metadata(args, device), config=dict(
        models=args.models, variants=args.variants, batch_size=args.batch_size, input_size=args.input_size,
        rounds=args.rounds, warmup=args.warmup, iters=args.iters, amp=args.amp, seed=args.seed, lr=args.lr,
        optimizer='SGD(momentum=0.9, weight_decay=1e-4)'), results={})
    for name in args.models:
        report['results'][name] = benchmark_model(name, args, device)
    report['metadata']['wall_time_s'] = round(time.perf_counter() - start, 1)
    report['metadata']['load_average_end'] = _load_average()

    os.makedirs(args.out_dir, exist_ok=True)
    base = osp.join(args.out_dir, f'benchmark_{"_".join(args.models)}_{stem}')
    with open(base + '.json', 'w') as f:
        json.dump(report, f, indent=2)
    with open(base + '.md', 'w') as f:
        f.write(markdown(report))
    header, rows = table_rows(report)
    print('\n' + text_table(header, rows), flush=True)
    for line in comparisons(report) + workload_lines(report):
        print(line)
    written = [base + '.json', base + '.md']
    if draw_chart(report, base + '.png'):
        written.append(base + '.png')
    else:
        print('matplotlib is not installed: no chart drawn (pip install matplotlib)')
    print(f'wrote {", ".join(written)} in {report["metadata"]["wall_time_s"]:.0f} s', flush=True)
    return report


if __name__ == '__main__':
    main()
