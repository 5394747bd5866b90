"""Convert the authors' OREPA ImageNet ResNet checkpoints into the layout of an OpenMMLab ResNet or classifier.

The reference code (JUGGHM/OREPA_CVPR2022) publishes ``.pth.tar`` files of OREPA ResNet-18/34/50/101, a dict
with ``state_dict`` whose keys usually carry a ``module.`` prefix.  This tool reads such a file (training form,
with the branch parameters, or deploy form, with one ``*_reparam`` conv plus bias per layer) and writes an
mmengine-style checkpoint ``{'state_dict': ..., 'meta': ...}`` for

* ``OREPAResNet(depth=D)`` (mmdet/mmseg ``ResNet`` with ``conv_cfg=dict(type='OREPA')``), the default: the
  branch parameters map one to one onto :class:`orepa_mm.layers.OREPAConv2d`, so the result computes what the
  reference model computes and can be trained further as OREPA;
* ``ResNet(depth=D)`` (vanilla, ``conv_cfg=None``) with ``--fused``: every layer's generated kernel (for the
  stem the reference's cross-correlated 7x7 kernel) and its BN unchanged;
* with ``--classifier``, either of them as an mmpretrain ``ImageClassifier`` (``backbone.*``, plus the
  reference's ``linear`` as ``head.fc`` of a ``LinearClsHead`` after ``GlobalAveragePooling``), which
  ``mim test mmpretrain`` evaluates with the matching config of ``configs/mmpretrain/`` (the ``-orepa`` one,
  or the ``-plain`` one for ``--fused``).  Without it the output is backbone-only, the ``init_cfg``
  checkpoint of mmdet/mmseg/mmpretrain backbones.

Usage::

    python tools/model_converters/convert_reference_checkpoint.py SRC DST [--fused] [--classifier] [--force]

Mapping, per reference layer (``v`` is the reference ``vector``):

* k x k block -> ``branches.*`` of an :class:`~orepa_mm.layers.OREPAKxKBranches`: ``weight_orepa_origin`` ->
  ``weight_origin``; the 1x1 factors ``weight_orepa_avg_conv``, ``weight_orepa_pfir_conv``,
  ``weight_orepa_1x1``, ``weight_orepa_1x1_kxk_idconv1``, ``weight_orepa_gconv_pw`` -> ``weight_avg``,
  ``weight_prior``, ``weight_1x1``, ``weight_1x1_kxk_first``, ``weight_pw`` (as matrices);
  ``weight_orepa_1x1_kxk_conv2`` -> ``weight_1x1_kxk_second``; ``weight_orepa_gconv_dw`` -> ``weight_dw``;
  ``vector`` -> ``branch_scales`` (same row order).  The reference's constant buffers (average box, identity,
  frequency prior) are not stored by orepa_mm, which rebuilds them; the tool checks that they equal orepa_mm's
  constants and refuses the file otherwise.
* 1x1 block -> :class:`~orepa_mm.layers.OREPA1x1Branches`: ``weight_or1x1_origin`` -> ``weight_origin``,
  ``weight_or1x1_l2i_conv1`` (``t x in``) -> ``weight_l2i_first``, ``weight_or1x1_l2i_conv2`` (``out x t``)
  -> ``weight_l2i_second``, ``t = min(in, out)`` in both codes; ``vector`` -> ``branch_scales``.
* Stem (the reference's large-kernel block ``stage0.conv1``, three 3x3 OREPA kernels ``K0, K1, K2``) ->
  :class:`~orepa_mm.layers.OREPAStackedBranches`.  The reference composes the kernels by cross-correlation
  (``conv2d`` without flipping; docs/method.md, reference defect 5) while orepa_mm composes the true kernel
  of the stacked convs.
  Cross-correlating with ``B`` equals composing with ``B`` rotated by 180 degrees, so the reference kernel is
  ``compose(K0, rot(K1), rot(K2))`` (same order, ``K0`` applied first), and a rotated OREPA k x k kernel is
  again an OREPA k x k kernel: rotate the origin, the second factor of 1x1-kxk and the depthwise kernels; the
  average box and the centre tap are symmetric; the prior basis of an output channel with frequency ``f``
  rotates into ``(-1)^f`` times itself, so the rows of ``weight_prior`` with odd frequency change sign.  This
  mapping (``flipped-generators``) is exact and keeps the stem's branch structure trainable:
  ``branch_scales = [0, 1]`` (origin off, stack on), ``weight_origin`` holds a fixed-seed Kaiming draw like a
  fresh layer.  The tool verifies it numerically against :func:`orepa_mm.kernels.cross_correlate_kernels`
  (float64) and refuses to write anything should it ever not hold.
* ResNet-18/34 shortcut (a plain ``conv`` + ``bn`` in the reference) and every deploy-form conv: written as
  explicit branch values, not as a plain ``weight`` key: origin = the kernel, origin scale 1, every other
  scale 0, and the other branch parameters at orepa_mm's (fixed-seed) initial values, i.e. exactly what
  :class:`~orepa_mm.layers.OREPAConv2d`'s plain-weight load hook would produce, but independent of it.
* BN ``<layer>.bn.*`` -> the ResNet's BN of that conv (``bn1``, ``layer{s}.{b}.bn{j}``,
  ``layer{s}.{b}.downsample.1``).  A deploy-form conv has a bias and no BN: its BN becomes a pass-through
  (running mean 0, running var 1, weight ``sqrt(1 + eps)``, bias = the conv bias, ``eps = 1e-5``).
* Names: ``stage0.conv1`` -> ``conv1``; ``stage{s}.{b}.conv{j}`` -> ``layer{s}.{b}.conv{j}``;
  ``stage{s}.{b}.shortcut`` -> ``layer{s}.{b}.downsample.0``.  ``linear.*`` (the ImageNet classifier) is
  dropped and reported, or with ``--classifier`` becomes ``head.fc.*`` (the same matrix and bias: the
  reference pools globally before it, as ``GlobalAveragePooling`` does).

The depth (18, 34, 50, 101, 152) is detected from the number of blocks per stage and the block type.  Any
other key, a missing key or a wrong shape is an error: nothing is written.  The output is written atomically
and an existing file is kept unless ``--force`` is given.

The module can be imported: :func:`convert` works on an in-memory state dict.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

import orepa_mm
from orepa_mm import kernels as K
from orepa_mm.checkpoint import load_checkpoint_file, save_atomic
from orepa_mm.cli import EXIT_STATUS_HELP, ToolError, tool_main
from orepa_mm.layers import OREPAKxKBranches
from orepa_mm.layers.orepa import build_branches

__all__ = ['ConversionError', 'Conversion', 'convert', 'detect_depth', 'layer_specs', 'main']

#: BatchNorm eps of the reference model and of mmdet/mmseg/mmpretrain ResNets.
BN_EPS = 1e-5
#: Seed of the fixed draws used for branches a checkpoint does not determine.
FILL_SEED = 0
#: depth -> (block type, blocks per stage), as in mmdet's ``ResNet.arch_settings``.
ARCH: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
DROPPED_PREFIXES = ('linear.', )


def feature_width(depth: int) -> int:
    """Channels of the last stage of a ResNet of ``depth``: what its classifier reads."""
    return 512 * (4 if ARCH[depth][0] == 'bottleneck' else 1)

DEPLOY_NAMES = {1: 'or1x1_reparam', 3: 'orepa_reparam', 7: 'or_large_reparam'}
BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var')
STEM_FLIPPED = 'flipped-generators'
CONVERTER = 'tools/model_converters/convert_reference_checkpoint.py'


class ConversionError(ToolError):
    """The checkpoint cannot be converted; the message says why."""


@dataclass(frozen=True)
class LayerSpec:
    """One conv of the ResNet: its reference name, its target names and its shape."""

    source: str
    conv: str
    bn: str
    in_channels: int
    out_channels: int
    kernel_size: int


@dataclass
class Conversion:
    """Result of :func:`convert`."""

    state_dict: Dict[str, Tensor]
    depth: int
    form: str
    fused: bool
    stem_mapping: Optional[str]
    layer_kinds: Counter = field(default_factory=Counter)
    dropped_keys: List[str] = field(default_factory=list)
    #: Classes of the classifier head, when the state dict is a whole ``ImageClassifier``'s.
    num_classes: Optional[int] = None

    @property
    def target(self) -> str:
        """Registry name of the backbone the state dict is for."""
        return 'ResNet' if self.fused else 'OREPAResNet'

    def model_config(self) -> Dict[str, Any]:
        """The mmpretrain model the state dict loads into (its backbone alone without a head)."""
        backbone = dict(type=self.target, depth=self.depth)
        if self.num_classes is None:
            return backbone
        return dict(type='ImageClassifier', backbone=dict(backbone, num_stages=4, out_indices=(3, )),
                    neck=dict(type='GlobalAveragePooling'),
                    head=dict(type='LinearClsHead', num_classes=self.num_classes,
                              in_channels=feature_width(self.depth)))

    def meta(self, source: str) -> Dict[str, Any]:
        """The checkpoint's ``meta`` entry: where it came from and what it is for."""
        return dict(source=source, depth=self.depth, form=self.form, fused=self.fused, target=self.target,
                    backbone=dict(type=self.target, depth=self.depth), model=self.model_config(),
                    stem_mapping=self.stem_mapping, dropped_keys=list(self.dropped_keys), converter=CONVERTER,
                    orepa_mm_version=orepa_mm.__version__)

    def summary(self) -> str:
        kinds = ', '.join(f'{n} {kind}' for kind, n in sorted(self.layer_kinds.items()))
        lines = [f'detected: reference OREPA ResNet-{self.depth}, {self.form} form',
                 f'converted {sum(self.layer_kinds.values())} conv layers ({kinds}) and their BNs',
                 f'target: backbone=dict(type={self.target!r}, depth={self.depth})'
                 + ('' if self.fused else ", i.e. an OpenMMLab ResNet with conv_cfg=dict(type='OREPA')")]
        if self.num_classes is not None:
            lines.append(f'classifier: mmpretrain ImageClassifier, backbone.* + head.fc ({self.num_classes} classes)')
        if self.stem_mapping:
            lines.append(f'stem: {self.stem_mapping}')
        dropped = ', '.join(self.dropped_keys) + ' (the ImageNet classifier)' if self.dropped_keys else 'none'
        lines.append(f'dropped keys: {dropped}')
        return '\n'.join(lines)


# -- layout -----------------------------------------------------------------------------------------------
def layer_specs(depth: int) -> List[LayerSpec]:
    """Every conv of a ResNet of ``depth``, in the order of the mmdet/mmseg ResNet."""
    block, counts = ARCH[depth]
    expansion = 4 if block == 'bottleneck' else 1
    specs = [LayerSpec('stage0.conv1', 'conv1', 'bn1', 3, 64, 7)]
    inplanes = 64
    for s, n in enumerate(counts, 1):
        planes = 64 * 2 ** (s - 1)
        for b in range(n):
            src, dst = f'stage{s}.{b}', f'layer{s}.{b}'
            if block == 'bottleneck':
                convs = [(1, inplanes, planes), (3, planes, planes), (1, planes, planes * expansion)]
            else:
                convs = [(3, inplanes, planes), (3, planes, planes)]
            for j, (k, cin, cout) in enumerate(convs, 1):
                specs.append(LayerSpec(f'{src}.conv{j}', f'{dst}.conv{j}', f'{dst}.bn{j}', cin, cout, k))
            # mmdet/mmseg (and the reference) add a projection where the stride or the width changes.
            if b == 0 and (s > 1 or inplanes != planes * expansion):
                specs.append(LayerSpec(f'{src}.shortcut', f'{dst}.downsample.0', f'{dst}.downsample.1',
                                       inplanes, planes * expansion, 1))
            inplanes = planes * expansion
    return specs


def extract_state_dict(obj: Any) -> Dict[str, Tensor]:
    """The state dict of a loaded checkpoint (``{'state_dict': ...}`` or a bare one), ``module.`` removed."""
    if isinstance(obj, Mapping) and 'state_dict' in obj:
        obj = obj['state_dict']
    if not isinstance(obj, Mapping) or not obj:
        got = 'an empty dict' if isinstance(obj, Mapping) else type(obj).__name__
        raise ConversionError(f'unknown layout: expected a state dict or a dict with "state_dict", got {got}')
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        keys = ', '.join(list(map(str, obj))[:6])
        raise ConversionError(f'unknown layout: the checkpoint holds no "state_dict" and is not a state dict '
                              f'(top-level keys: {keys})')
    state: Dict[str, Tensor] = {}
    for key, value in obj.items():
        name = key[len('module.'):] if key.startswith('module.') else key
        if name in state:
            raise ConversionError(f'unknown layout: {name!r} occurs with and without the "module." prefix')
        state[name] = value
    return state


def detect_depth(state: Mapping[str, Tensor]) -> int:
    """ResNet depth of a reference state dict, from its blocks per stage and its block type."""
    blocks: Dict[int, set] = {}
    for key in state:
        m = re.match(r'stage(\d+)\.(\d+)\.', key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not any(k.startswith('stage0.conv1.') for k in state) or sorted(blocks) != [1, 2, 3, 4]:
        sample = ', '.join(sorted(state)[:4])
        raise ConversionError('unknown layout: not a reference OREPA ResNet (expected stage0.conv1.* and '
                              f'stage{{1-4}}.{{block}}.* keys, found e.g. {sample})')
    counts = tuple(max(blocks[s]) + 1 for s in (1, 2, 3, 4))
    if any(blocks[s] != set(range(n)) for s, n in zip((1, 2, 3, 4), counts)):
        found = {s: sorted(blocks[s]) for s in sorted(blocks)}
        raise ConversionError(f'unknown layout: the block indices per stage are not contiguous: {found}')
    block = 'bottleneck' if any(k.startswith('stage1.0.conv3.') for k in state) else 'basic'
    for depth, arch in ARCH.items():
        if arch == (block, counts):
            return depth
    raise ConversionError(f'unsupported depth: {block} blocks per stage {counts} match no ResNet depth of '
                          f'{sorted(ARCH)} ({", ".join(f"{d}: {a[1]} {a[0]}" for d, a in ARCH.items())})')


class _Reader:
    """Takes keys out of a state dict, checking shapes and remembering what was used."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = state
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: Optional[Sequence[int]] = None) -> Tensor:
        if key not in self.state:
            raise ConversionError(f'unknown layout: missing key {key!r}')
        t = self.state[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConversionError(f'unknown layout: {key} has shape {tuple(t.shape)}, expected {tuple(shape)} '
                                  '(a groups=1 OREPA ResNet of standard width)')
        self.used.add(key)
        return t


# -- reading one layer ------------------------------------------------------------------------------------
def _check_constant(key: str, value: Tensor, expected: Tensor, what: str) -> None:
    diff = (value.double() - expected.double()).abs().max().item()
    if not diff <= 1e-5:
        raise ConversionError(f'{key} is not {what} (max difference {diff:.3g}); orepa_mm rebuilds this '
                              'constant and cannot represent the checkpoint exactly')


def _read_kxk(r: _Reader, p: str, cin: int, cout: int, k: int) -> Dict[str, Tensor]:
    """Branch values of an :class:`OREPAKxKBranches` from a reference k x k block at prefix ``p``."""
    e = OREPAKxKBranches.EXPAND

    def take(name: str, *shape: int) -> Tensor:
        return r.take(f'{p}.{name}', shape)

    out = {
        'weight_origin': take('weight_orepa_origin', cout, cin, k, k),
        'weight_avg': take('weight_orepa_avg_conv', cout, cin, 1, 1).flatten(1),
        'weight_prior': take('weight_orepa_pfir_conv', cout, cin, 1, 1).flatten(1),
        'weight_1x1': take('weight_orepa_1x1', cout, cin, 1, 1).flatten(1),
        'weight_1x1_kxk_first': take('weight_orepa_1x1_kxk_idconv1', cin, cin, 1, 1).flatten(1),
        'weight_1x1_kxk_second': take('weight_orepa_1x1_kxk_conv2', cout, cin, k, k),
        'weight_dw': take('weight_orepa_gconv_dw', e * cin, 1, k, k),
        'weight_pw': take('weight_orepa_gconv_pw', cout, e * cin, 1, 1).flatten(1),
        'branch_scales': take('vector', 6, cout),
    }
    _check_constant(f'{p}.weight_orepa_avg_avg', take('weight_orepa_avg_avg', k, k), K.box_kernel(k),
                    f'the {k}x{k} average box')
    _check_constant(f'{p}.id_tensor', take('id_tensor', cin, cin, 1, 1).flatten(1), K.grouped_identity(cin, cin),
                    'the identity')
    _check_constant(f'{p}.weight_orepa_prior', take('weight_orepa_prior', cout, k, k),
                    K.frequency_prior(cout, k), 'the frequency-prior basis')
    return out


def _read_1x1(r: _Reader, p: str, cin: int, cout: int) -> Dict[str, Tensor]:
    """Branch values of an :class:`OREPA1x1Branches` from a reference 1x1 block at prefix ``p``."""
    t = min(cin, cout)
    return {
        'weight_origin': r.take(f'{p}.weight_or1x1_origin', (cout, cin, 1, 1)).flatten(1),
        'weight_l2i_first': r.take(f'{p}.weight_or1x1_l2i_conv1', (t, cin, 1, 1)).flatten(1),
        'weight_l2i_second': r.take(f'{p}.weight_or1x1_l2i_conv2', (cout, t, 1, 1)).flatten(1),
        'branch_scales': r.take(f'{p}.vector', (2, cout)),
    }


def _read_bn(r: _Reader, p: str, cout: int) -> Dict[str, Tensor]:
    bn = {name: r.take(f'{p}.{name}', (cout, )) for name in BN_FIELDS}
    key = f'{p}.num_batches_tracked'
    bn['num_batches_tracked'] = r.take(key) if r.has(key) else torch.tensor(0, dtype=torch.long)
    return bn


def _pass_through_bn(bias: Tensor) -> Dict[str, Tensor]:
    """BN (eval mode, ``eps = BN_EPS``) that computes ``y + bias``."""
    return {'weight': torch.full_like(bias, math.sqrt(1 + BN_EPS)), 'bias': bias.clone(),
            'running_mean': torch.zeros_like(bias), 'running_var': torch.ones_like(bias),
            'num_batches_tracked': torch.tensor(0, dtype=torch.long)}


def _prior_rotation_sign(cout: int) -> Tensor:
    """``s`` with ``rot180(B[o]) == s[o] * B[o]`` for the frequency-prior basis ``B``: each row is
    ``cos(pi * (h + 0.5) * f / k)`` along one axis, and ``h -> k - 1 - h`` turns it into
    ``cos(pi * f - ...) = (-1)^f`` times itself, ``f`` the row's frequency (``o + 1`` or ``o + 1 - cout / 2``),
    an integer for the even widths of every ResNet."""
    if cout % 2:
        raise ConversionError(f'a stem of odd width {cout} is not a reference OREPA ResNet stem')
    o = torch.arange(cout, dtype=torch.float64)
    freq = torch.where(o < cout / 2, o + 1, o + 1 - cout / 2)
    return torch.where(freq % 2 == 0, 1.0, -1.0).to(torch.float64)


def _rotate_kxk(state: Dict[str, Tensor], cout: int) -> Dict[str, Tensor]:
    """Branch values whose OREPA k x k kernel is the kernel of ``state`` rotated by 180 degrees."""
    out = dict(state)
    for name in ('weight_origin', 'weight_1x1_kxk_second', 'weight_dw'):
        out[name] = state[name].flip(-1, -2)
    out['weight_prior'] = state['weight_prior'] * _prior_rotation_sign(cout).to(state['weight_prior'].dtype)[:, None]
    return out


class _Modules:
    """Branch modules by shape, built once per conversion (building one draws its initial values)."""

    def __init__(self) -> None:
        self._modules: Dict[Tuple[int, int, int], torch.nn.Module] = {}
        self._fresh: Dict[Tuple[int, int, int], Dict[str, Tensor]] = {}

    @staticmethod
    def _build(cin: int, cout: int, k: int) -> torch.nn.Module:
        return build_branches(cin, cout, k)  # the reference picks blocks by kernel size as orepa_mm does

    def get(self, cin: int, cout: int, k: int) -> torch.nn.Module:
        if (cin, cout, k) not in self._modules:
            self._modules[cin, cout, k] = self._build(cin, cout, k)
        return self._modules[cin, cout, k]

    def fresh_state(self, cin: int, cout: int, k: int) -> Dict[str, Tensor]:
        """The values of a newly built layer, drawn from ``FILL_SEED`` (the same for every layer of a shape)."""
        if (cin, cout, k) not in self._fresh:
            torch.manual_seed(FILL_SEED)
            module = self._build(cin, cout, k)
            self._fresh[cin, cout, k] = {name: t.detach() for name, t in module.state_dict().items()}
        return dict(self._fresh[cin, cout, k])

    def kernel(self, cin: int, cout: int, k: int, state: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """The kernel the branch module generates from ``state``, computed in ``dtype``."""
        module = self.get(cin, cout, k).to(dtype)
        module.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True)
        with torch.no_grad():
            return module().detach().clone()


def _plain_branch_state(modules: _Modules, spec: LayerSpec, weight: Tensor) -> Dict[str, Tensor]:
    """Branch values of a fresh (fixed-seed) layer set up to compute the plain kernel ``weight``."""
    k, cin, cout = spec.kernel_size, spec.in_channels, spec.out_channels
    state = {name: t.to(weight.dtype) for name, t in modules.fresh_state(cin, cout, k).items()}
    plain = modules.get(cin, cout, k).plain_state(weight)
    state.update({name: t.to(weight.dtype) for name, t in plain.items()})
    return state


@dataclass
class _Layer:
    kind: str
    form: Optional[str]  # 'train' or 'deploy'; None for a plain conv, which looks the same in both
    branches: Optional[Dict[str, Tensor]]  # OREPA branch values, keyed below ``branches.``
    kernel: Optional[Tensor]  # the plain kernel the layer computes (reference semantics); only when fusing
    bn: Dict[str, Tensor]
    stem_mapping: Optional[str] = None


def _read_plain(r: _Reader, modules: _Modules, spec: LayerSpec, key_prefix: str, kind: str,
                form: Optional[str], fused: bool) -> _Layer:
    """A conv with an optional bias and an optional BN ``<layer>.bn`` (deploy form, ResNet-18/34 shortcut)."""
    k, cin, cout = spec.kernel_size, spec.in_channels, spec.out_channels
    weight = r.take(f'{key_prefix}.weight', (cout, cin, k, k))
    bias_key = f'{key_prefix}.bias'
    bias = r.take(bias_key, (cout, )) if r.has(bias_key) else None
    bn_prefix = f'{spec.source}.bn'
    if any(key.startswith(bn_prefix + '.') for key in r.state):
        bn = _read_bn(r, bn_prefix, cout)
        if bias is not None:  # BN(y + b) == BN(y) with the mean moved by b
            bn['running_mean'] = K.fold_bias_into_bn(bias, bn['running_mean'])
    else:
        bn = _pass_through_bn(bias if bias is not None else weight.new_zeros(cout))
    branches = None if fused else _plain_branch_state(modules, spec, weight)
    return _Layer(kind, form, branches, weight, bn)


def _read_layer(r: _Reader, modules: _Modules, spec: LayerSpec, fused: bool) -> _Layer:
    """Read the reference layer ``spec.source`` in whichever form the checkpoint has it."""
    p, k, cin, cout = spec.source, spec.kernel_size, spec.in_channels, spec.out_channels
    deploy = f'{p}.{DEPLOY_NAMES[k]}'
    if r.has(f'{deploy}.weight'):
        return _read_plain(r, modules, spec, deploy, 'deploy conv', 'deploy', fused)
    if r.has(f'{p}.conv.weight'):
        return _read_plain(r, modules, spec, f'{p}.conv', 'plain conv', None, fused)
    if k == 7:
        return _read_stem(r, modules, spec)
    if k == 1:
        branches = _read_1x1(r, p, cin, cout)
        kernel = modules.kernel(cin, cout, k, branches, branches['weight_origin'].dtype) if fused else None
        return _Layer('OREPA 1x1', 'train', branches, kernel, _read_bn(r, f'{p}.bn', cout))
    branches = _read_kxk(r, p, cin, cout, k)
    kernel = modules.kernel(cin, cout, k, branches, branches['weight_origin'].dtype) if fused else None
    return _Layer(f'OREPA {k}x{k}', 'train', branches, kernel, _read_bn(r, f'{p}.bn', cout))


def _read_stem(r: _Reader, modules: _Modules, spec: LayerSpec) -> _Layer:
    """The reference large-kernel block: three 3x3 OREPA kernels composed by cross-correlation."""
    p, cin, cout, k = spec.source, spec.in_channels, spec.out_channels, spec.kernel_size
    n = (k - 1) // 2
    subs = [_read_kxk(r, f'{p}.weight{i}', cin if i == 0 else cout, cout, 3) for i in range(n)]
    # float64 here: the stem is small and the mapping check below compares to rounding error.
    generated = [modules.kernel(cin if i == 0 else cout, cout, 3, s, torch.float64) for i, s in enumerate(subs)]
    reference = generated[0]
    for g in generated[1:]:
        reference = K.cross_correlate_kernels(reference, g)
    bn = _read_bn(r, f'{p}.bn', cout)
    dtype = subs[0]['weight_origin'].dtype

    state = {name: t.to(dtype) for name, t in modules.fresh_state(cin, cout, k).items()}  # origin: fixed draw
    rotated = [subs[0]] + [_rotate_kxk(s, cout) for s in subs[1:]]
    for i, s in enumerate(rotated):
        state.update({f'stack.{i}.{name}': t for name, t in s.items()})
    state['branch_scales'] = torch.stack([torch.zeros(cout), torch.ones(cout)]).to(dtype)
    ours = modules.kernel(cin, cout, k, state, torch.float64)
    gap = (ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30)
    if gap > 1e-9:
        raise RuntimeError(f'{p}: the flipped stem generators miss the reference kernel by {gap:.2e} (relative)')
    return _Layer('OREPA stem', 'train', state, reference, bn, STEM_FLIPPED)


# -- conversion -------------------------------------------------------------------------------------------
def _refuse_unexpected(keys: Sequence[str], depth: int) -> None:
    if keys:
        more = f' and {len(keys) - 8} more' if len(keys) > 8 else ''
        raise ConversionError(f'unknown layout: unexpected keys for a reference OREPA ResNet-{depth}: '
                              f'{", ".join(sorted(keys)[:8])}{more}')


def _classifier_state(state: Mapping[str, Tensor], backbone: Dict[str, Tensor], depth: int
                      ) -> Tuple[Dict[str, Tensor], int]:
    """The ``ImageClassifier`` state dict: the backbone under ``backbone.``, ``linear`` as ``head.fc``."""
    width = feature_width(depth)
    weight, bias = state.get('linear.weight'), state.get('linear.bias')
    if weight is None or bias is None:
        raise ConversionError('the checkpoint has no classifier (linear.weight and linear.bias): convert it '
                              'without --classifier, as a backbone')
    if weight.dim() != 2 or weight.shape[1] != width or tuple(bias.shape) != (weight.shape[0], ):
        raise ConversionError(f'linear.weight {tuple(weight.shape)} / linear.bias {tuple(bias.shape)} do not fit '
                              f'a ResNet-{depth} classifier (expected (classes, {width}) and (classes,))')
    out = {f'backbone.{k}': v for k, v in backbone.items()}
    out['head.fc.weight'], out['head.fc.bias'] = weight.contiguous(), bias.contiguous()
    return out, int(weight.shape[0])


def convert(checkpoint: Any, fused: bool = False, classifier: bool = False) -> Conversion:
    """Convert a loaded reference checkpoint (or its state dict) in memory.

    Args:
        checkpoint: the object ``torch.load`` returned: ``{'state_dict': ...}`` or a bare state dict, keys with
            or without ``module.``.
        fused: produce a vanilla ``ResNet`` state dict (generated kernels) instead of an ``OREPAResNet`` one.
        classifier: produce the whole mmpretrain ``ImageClassifier`` (``backbone.*`` and ``head.fc.*``)
            instead of the backbone alone.

    Raises:
        ConversionError: unknown layout, missing or unexpected keys, wrong shapes, unsupported depth.
    """
    state = extract_state_dict(checkpoint)
    depth = detect_depth(state)
    specs = layer_specs(depth)
    known = tuple(f'{spec.source}.' for spec in specs) + DROPPED_PREFIXES
    _refuse_unexpected([key for key in state if not key.startswith(known)], depth)  # fail before the work
    reader = _Reader(state)
    out: Dict[str, Tensor] = {}
    kinds: Counter = Counter()
    forms = set()
    stem_mapping = None
    modules = _Modules()
    with torch.random.fork_rng(devices=[]):  # building modules draws numbers: leave the caller's RNG alone
        for spec in specs:
            layer = _read_layer(reader, modules, spec, fused)
            kinds[layer.kind] += 1
            if layer.form is not None:
                forms.add(layer.form)
            stem_mapping = layer.stem_mapping or stem_mapping
            dtype = layer.bn['weight'].dtype
            if fused:
                out[f'{spec.conv}.weight'] = layer.kernel.to(dtype).contiguous()
            else:
                for name, t in layer.branches.items():
                    out[f'{spec.conv}.branches.{name}'] = t.to(dtype).contiguous()
            for name, t in layer.bn.items():
                out[f'{spec.bn}.{name}'] = t.contiguous()
    rest = sorted(set(state) - reader.used)
    dropped = [key for key in rest if key.startswith(DROPPED_PREFIXES)]
    _refuse_unexpected([key for key in rest if key not in dropped], depth)
    form = forms.pop() if len(forms) == 1 else 'mixed'
    num_classes = None
    if classifier:
        out, num_classes = _classifier_state(state, out, depth)
        dropped = []
    return Conversion(out, depth, form, fused, None if fused else stem_mapping, kinds, dropped, num_classes)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the tool."""
    parser = argparse.ArgumentParser(
        description='Convert an official OREPA ResNet checkpoint (JUGGHM/OREPA_CVPR2022, training or deploy '
                    'form) to an OpenMMLab OREPAResNet (default) or vanilla ResNet (--fused) checkpoint, '
                    'backbone-only (default) or an mmpretrain ImageClassifier (--classifier).',
        epilog=EXIT_STATUS_HELP)
    parser.add_argument('src', help='reference checkpoint (.pth.tar or .pth)')
    parser.add_argument('dst', help='output checkpoint (.pth)')
    parser.add_argument('--fused', action='store_true',
                        help='write a vanilla ResNet (conv_cfg=None) with the generated kernels')
    parser.add_argument('--classifier', action='store_true',
                        help='write the whole mmpretrain ImageClassifier (backbone.* and the ImageNet head as '
                             'head.fc.*) instead of the backbone alone')
    parser.add_argument('--force', action='store_true', help='overwrite DST if it exists')
    return parser


@tool_main('convert_reference_checkpoint')
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point."""
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.dst):
        raise ConversionError(f'{args.dst} is a directory; give the output file name')
    if os.path.exists(args.dst) and not args.force:
        raise ConversionError(f'{args.dst} exists; pass --force to overwrite it')
    result = convert(load_checkpoint_file(args.src), fused=args.fused, classifier=args.classifier)
    save_atomic({'state_dict': result.state_dict, 'meta': result.meta(os.path.abspath(args.src))}, args.dst)
    print(result.summary())
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    raise SystemExit(main())
