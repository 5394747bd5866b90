"""The one place that turns a re-parameterizable model into a plain one.

A DBB layer (and any re-param layer built without a bias) fuses into a conv
WITH a bias that the vanilla layer lacks.  :func:`fuse_model_with_report`
folds that bias into the BatchNorm that consumes the conv's output, found

1. by name, for the layouts of OpenMMLab models (``nn.Sequential``, mmcv's
   ``ConvModule``, ResNet-style ``convN`` -> ``normN``/``bnN``), else
2. by following the data: one forward pass of ``example_input`` (through the
   model's ``extract_feat`` when it has one, as mmdet/mmseg models do, else
   the model itself) records which BatchNorm receives exactly the conv's
   output tensor, at every call of the conv, with no other consumer of that
   tensor (checked on the autograd graph) and no other input to that BN; or,
   for a conv called once, the BN that receives exactly the channel
   concatenation (``torch.cat`` along channels) that is the output's only
   consumer (CGNet's local and surrounding convs): the bias then shifts that
   slice of the BN's running mean.

Convs the trace does not reach (heads behind ``extract_feat``) rely on the
name lookup; where neither finds a BN the fused conv keeps its bias (the
model stays exactly equivalent) and its name is reported in
:attr:`FuseReport.biased_convs`: the vanilla config needs ``bias=True`` there.
"""
from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from . import kernels as K
from .layers.base import ReparamConv2d

__all__ = ['FuseReport', 'fuse_model', 'fuse_model_with_report', 'count_reparam_layers',
           'DEFAULT_TRACE_SIZE']

_NORM_TYPES = (_BatchNorm, )

#: Spatial size of the zero input traced when no ``example_input`` is given.
DEFAULT_TRACE_SIZE = 64


@dataclass
class FuseReport:
    """What :func:`fuse_model_with_report` did.

    Attributes:
        model: the fused model.
        biased_convs: qualified names (as in ``model.named_modules()``; ``''``
            when the model is a single layer) of the fused convs that carry a
            bias their vanilla layer lacks, because no BatchNorm follows them
            to absorb it.  A vanilla model loads the fused weights only where
            those convs are built with ``bias=True``.
    """
    model: nn.Module
    biased_convs: List[str] = field(default_factory=list)


def count_reparam_layers(model: nn.Module) -> int:
    """Number of OREPA/DBB layers in ``model``."""
    return sum(isinstance(m, ReparamConv2d) for m in model.modules())


def _following_norm(parent: nn.Module, name: str) -> Optional[nn.Module]:
    """The BatchNorm that consumes the output of ``parent.<name>``, if known by name.

    Covers the layouts of OpenMMLab models: ``nn.Sequential`` (next child),
    mmcv's ``ConvModule`` (``conv`` -> ``norm`` when the norm comes right
    after the conv) and mmdet/mmseg ResNet blocks and stems (``convN`` ->
    ``normN``/``bnN``).
    """
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        i = names.index(name)
        nxt = parent[i + 1] if i + 1 < len(names) else None
        return nxt if isinstance(nxt, _NORM_TYPES) else None
    order = getattr(parent, 'order', None)
    if name == 'conv' and getattr(parent, 'with_norm', False) and order is not None:
        if list(order).index('norm') == list(order).index('conv') + 1:
            return parent.norm
        return None
    m = re.fullmatch(r'conv(\d*)', name)
    if m:
        for attr in (f'norm{m.group(1)}_name', ):
            if isinstance(getattr(parent, attr, None), str):
                norm = getattr(parent, getattr(parent, attr))
                return norm if isinstance(norm, _NORM_TYPES) else None
        for attr in (f'norm{m.group(1)}', f'bn{m.group(1)}'):
            norm = getattr(parent, attr, None)
            if isinstance(norm, _NORM_TYPES):
                return norm
    return None


# -- the data-flow trace ---------------------------------------------------------------
def default_example_input(model: nn.Module, size: int = DEFAULT_TRACE_SIZE) -> Tensor:
    """A zero batch ``(1, C, size, size)`` in the dtype and on the device of the
    model's parameters, ``C`` the input channels of its first conv (3 if none)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, ReparamConv2d))), None)
    channels = first.in_channels if first is not None else 3
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.zeros(1, channels, size, size, dtype=dtype, device=device)


def _tensors(obj) -> List[Tensor]:
    """Every tensor in a (nested) output of a model."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _consumer_counts(outputs: List[Tensor]) -> Dict[object, int]:
    """For each autograd node reachable from ``outputs``, how many edges lead
    into it from other nodes (its number of uses in the computation)."""
    counts: Dict[object, int] = {}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: Set[object] = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts[nxt] = counts.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def _run_trace(model: nn.Module, example_input: Tensor) -> List[Tensor]:
    """Run ``example_input`` through the model (``extract_feat`` if it has
    one) in eval mode with autograd recording; restore the modes after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x = example_input.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            run = getattr(model, 'extract_feat', None)
            return _tensors(run(x) if callable(run) else model(x))
    finally:
        for m, mode in modes.items():
            m.training = mode


#: A BN and the first of its channels that a conv's output feeds.
NormSlice = Tuple[_BatchNorm, int]
_CATS = (torch.cat, torch.concat, torch.concatenate)


class _ChannelCats(TorchFunctionMode):
    """Records ``(inputs, output)`` of every concatenation of 4-d tensors along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.cats: List[Tuple[List[Tensor], Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CATS and isinstance(out, Tensor) and out.dim() == 4:
            tensors = args[0] if args else kwargs.get('tensors', ())
            dim = args[1] if len(args) > 1 else kwargs.get('dim', 0)
            if dim in (1, -3):
                self.cats.append((list(tensors), out))
        return out


def _trace_norms(model: nn.Module, convs: Dict[str, nn.Module],
                 example_input: Tensor) -> Dict[str, NormSlice]:
    """The BatchNorm (and channel offset) that exclusively consumes each
    conv's output, by the data flow.

    ``convs``: qualified name -> layer.  A conv gets a BN only when at every
    call its output tensor goes to that BN and nowhere else, and that BN
    only ever receives this conv's outputs; or through one channel
    concatenation (:func:`_cat_norm`).
    """
    conv_outputs: Dict[str, List[Tensor]] = {name: [] for name in convs}
    norm_inputs: Dict[nn.Module, List[Tensor]] = {}
    hooks = []

    def record_output(name):
        return lambda module, args, out: conv_outputs[name].append(out)

    def record_input(module, args):
        norm_inputs.setdefault(module, []).append(args[0] if args else None)

    for name, layer in convs.items():
        hooks.append(layer.register_forward_hook(record_output(name)))
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            hooks.append(m.register_forward_pre_hook(record_input))
    cats = _ChannelCats()
    try:
        with cats:
            outputs = _run_trace(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    uses = _consumer_counts(outputs + [t for ts in norm_inputs.values() for t in ts if isinstance(t, Tensor)])
    found = {}
    for name, outs in conv_outputs.items():
        norm = _exclusive_norm(outs, norm_inputs, uses)
        slice_ = (norm, 0) if norm is not None else _cat_norm(outs, cats.cats, norm_inputs, uses)
        if slice_ is not None:
            found[name] = slice_
    return found


def _cat_norm(outs: List[Tensor], cats: List[Tuple[List[Tensor], Tensor]],
              norm_inputs: Dict[nn.Module, List[Tensor]], uses: Dict[object, int]) -> Optional[NormSlice]:
    """For a conv called once whose output's only consumer is one channel
    concatenation that only a BN (called once) consumes: that BN and the
    output's first channel in the concatenation; else None."""
    if len(outs) != 1 or not isinstance(outs[0], Tensor) or uses.get(outs[0].grad_fn, 0) != 1:
        return None
    out = outs[0]
    hits = [(inputs, cat) for inputs, cat in cats if sum(t is out for t in inputs) == 1]
    if len(hits) != 1:
        return None
    inputs, cat = hits[0]
    norm = _exclusive_norm([cat], norm_inputs, uses)
    if norm is None:
        return None
    offset = 0
    for t in inputs:
        if t is out:
            return norm, offset
        offset += t.shape[1]
    return None


def _exclusive_norm(outs: List[Tensor], norm_inputs: Dict[nn.Module, List[Tensor]],
                    uses: Dict[object, int]) -> Optional[_BatchNorm]:
    """The one BN whose every input is one of ``outs`` and which receives every
    one of ``outs``, each of them used exactly once (by that BN); else None."""
    if not outs or not all(isinstance(t, Tensor) for t in outs):
        return None
    ids = {id(t) for t in outs}
    candidates = [bn for bn, ins in norm_inputs.items() if any(id(t) in ids for t in ins)]
    if len(candidates) != 1:
        return None
    bn = candidates[0]
    ins = norm_inputs[bn]
    if len(ins) != len(outs) or {id(t) for t in ins} != ids:
        return None
    if any(t.grad_fn is None or uses.get(t.grad_fn, 0) != 1 for t in outs):
        return None
    return bn


# -- fusing ------------------------------------------------------------------------------
def _plain_copy(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` without its bias."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
    plain.train(conv.training)
    return plain


@torch.no_grad()
def _absorb_bias(conv: nn.Conv2d, found: Optional[List[NormSlice]]) -> Optional[nn.Conv2d]:
    """Fold ``conv``'s bias into the running mean of the BN channels that
    each of its uses feeds (``found``: distinct (BN, first channel) pairs,
    each adjusted once) and return the conv without bias; None (nothing
    changed) when some use has no BN to absorb it."""
    if not found or any(getattr(norm, 'running_mean', None) is None for norm, _ in found):
        return None
    for norm, offset in found:
        mean = norm.running_mean[offset:offset + conv.out_channels]
        mean.copy_(K.fold_bias_into_bn(conv.bias, mean))
    return _plain_copy(conv)


def _reparam_children(model: nn.Module) -> List[Tuple[str, nn.Module, str, ReparamConv2d]]:
    """(qualified name, parent, attribute name, layer) of every edge to a
    re-param layer: a layer shared by several parents appears once per name."""
    found = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():  # named_children() names a shared child once
            if isinstance(child, ReparamConv2d):
                found.append((f'{parent_name}.{name}' if parent_name else name, parent, name, child))
    # named_modules(remove_duplicate=False) also lists a shared parent once per name: one edge per (parent, name).
    seen: Set[Tuple[int, str]] = set()
    return [e for e in found if (id(e[1]), e[2]) not in seen and not seen.add((id(e[1]), e[2]))]


def _norms_by_name(edges: List[Tuple[str, nn.Module, str, ReparamConv2d]]) -> Optional[List[NormSlice]]:
    """The distinct BNs that follow a layer under each of its names (by the
    layout of its parents), or None when some name has none: then only the
    data flow can tell."""
    found: List[NormSlice] = []
    for _, parent, name, _ in edges:
        norm = _following_norm(parent, name)
        if norm is None:
            return None
        if not any(norm is other for other, _ in found):
            found.append((norm, 0))
    return found


def fuse_model_with_report(model: nn.Module, inplace: bool = False,
                           example_input: Optional[Tensor] = None) -> FuseReport:
    """Replace every OREPA/DBB layer of ``model`` by its equivalent ``nn.Conv2d``.

    Each layer is fused once, however many names reach it: a layer shared by
    several parents (RetinaSepBNHead's convs, shared across FPN levels)
    becomes one conv that all of them share, so the fused model has the
    plain model's modules and parameter count.  A fused bias that the
    vanilla layer lacks is folded into the BatchNorm consuming the conv's
    output (by name, else by tracing the data flow of one forward pass: see
    the module docstring), into each BN once; a shared conv loses its bias
    only when every name that reaches it has its BN (e.g. one BN per FPN
    level, each absorbing the bias).  Where no BN is found the conv keeps
    the bias and all its names are listed in :attr:`FuseReport.biased_convs`.
    Fusing uses BN running statistics, so the result equals the original in
    eval mode.  Idempotent: a fused model is returned unchanged.

    Args:
        model: any module tree (a whole detector, a backbone, a single layer).
        inplace: modify ``model`` itself instead of a deep copy.
        example_input: an input batch ``(N, C, H, W)`` for the data-flow
            trace, fed to ``model.extract_feat`` if it exists, else to
            ``model``.  Only used when the name lookup misses a BN; default
            :func:`default_example_input` (zeros, ``1 x C x 64 x 64``).
    """
    if isinstance(model, ReparamConv2d):
        conv = model.fuse()
        return FuseReport(conv, [''] if conv.bias is not None and model.bias is None else [])
    if not inplace:
        model = copy.deepcopy(model)  # keeps sharing: a shared layer is copied once
    # Every layer once (first-seen order), with all the edges that reach it.
    edges: Dict[int, List[Tuple[str, nn.Module, str, ReparamConv2d]]] = {}
    for edge in _reparam_children(model):
        edges.setdefault(id(edge[3]), []).append(edge)
    fused = {key: uses[0][3].fuse() for key, uses in edges.items()}
    needs_norm = [key for key, uses in edges.items() if fused[key].bias is not None and uses[0][3].bias is None]
    norms: Dict[int, Optional[List[NormSlice]]] = {key: _norms_by_name(edges[key]) for key in needs_norm}
    missing = {edges[key][0][0]: edges[key][0][3] for key in needs_norm if norms[key] is None}
    if missing:
        traced = _trace_or_warn(model, missing, example_input)
        for key in needs_norm:
            if norms[key] is None and edges[key][0][0] in traced:
                norms[key] = [traced[edges[key][0][0]]]
    # BN channels that two different convs would feed absorb neither bias (they would take the sum).
    claims: Dict[Tuple[int, int], int] = {}
    for key in needs_norm:
        for norm, offset in norms[key] or []:
            claims[id(norm), offset] = claims.get((id(norm), offset), 0) + 1
    for key in needs_norm:
        if any(claims[id(norm), offset] > 1 for norm, offset in norms[key] or []):
            norms[key] = None
    biased = []
    for key in needs_norm:
        plain = _absorb_bias(fused[key], norms[key])
        if plain is None:
            biased.extend(qual for qual, _, _, _ in edges[key])
        else:
            fused[key] = plain
    for key, uses in edges.items():
        for _, parent, name, _ in uses:
            setattr(parent, name, fused[key])
    return FuseReport(model, biased)


def _trace_or_warn(model: nn.Module, convs: Dict[str, nn.Module],
                   example_input: Optional[Tensor]) -> Dict[str, NormSlice]:
    """:func:`_trace_norms`, or nothing found (with a warning) if the model
    cannot run ``example_input``."""
    if example_input is None:
        example_input = default_example_input(model)
    try:
        return _trace_norms(model, convs, example_input)
    except Exception as err:  # noqa: BLE001 - any model error: fall back to keeping the biases
        warnings.warn(f'fuse_model: tracing the data flow with an input of shape {tuple(example_input.shape)} '
                      f'failed ({type(err).__name__}: {err}); {len(convs)} fused conv(s) keep their bias')
        return {}


def fuse_model(model: nn.Module, inplace: bool = False, example_input: Optional[Tensor] = None) -> nn.Module:
    """:func:`fuse_model_with_report`'s fused model; logs a warning (mmengine's
    current logger) naming the convs that keep a bias.

    The result has exactly the ``state_dict`` keys and shapes of the same
    model built with ``conv_cfg=None`` wherever a BatchNorm follows each
    biased fused conv; otherwise those convs keep their bias (see
    :func:`fuse_model_with_report` for the list).

    Args:
        model: any module tree (a whole detector, a backbone, a single layer).
        inplace: modify ``model`` itself instead of a deep copy.
        example_input: input for the data-flow trace (see
            :func:`fuse_model_with_report`).
    """
    report = fuse_model_with_report(model, inplace, example_input)
    if report.biased_convs:
        print_log(f'fuse_model: {len(report.biased_convs)} fused conv(s) keep a bias because no BatchNorm follows '
                  f'them to absorb it; a vanilla model loads these weights only where they are built with '
                  f'bias=True: {", ".join(report.biased_convs)}', logger='current', level=logging.WARNING)
    return report.model
