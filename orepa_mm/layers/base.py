"""What every re-parameterizable conv of orepa_mm shares: the ``nn.Conv2d``
argument surface (so mmcv's ``build_conv_layer`` and ``ConvModule`` take it),
argument checks, conversion to a plain ``nn.Conv2d``, and constant buffers
that follow the parameters' dtype and device (:class:`ConstantBuffers`)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

IntOrPair = Union[int, Tuple[int, int]]
PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


class ConstantBuffers(nn.Module):
    """Mixin for modules whose constant buffers are a formula of (dtype, device).

    The average-pooling box, OREPA's frequency prior, identity matrices...
    are not learned and not saved; they must nevertheless match the
    parameters' dtype and device, or the first forward fails (a float32
    constant against float64 parameters) or loses precision (a float32 box
    widened to float64 is ``1/9`` to float32 precision only).  A subclass
    returns its constants from :meth:`constant_buffers`; the mixin registers
    them as non-persistent buffers when :meth:`build_constants` is called at
    the end of ``__init__`` (in the dtype and device the parameters were
    created with: default dtype, ``torch.device`` context, ``dtype=`` /
    ``device=`` arguments) and computes them again from the formula whenever
    ``.to()``, ``.double()``, ``.half()``, ``.cuda()``, ``to_empty()``...
    change the parameters' dtype or device, instead of casting the old values.
    """

    def constant_buffers(self, dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
        """The constants by buffer name, computed in ``dtype`` on ``device``."""
        raise NotImplementedError

    def _constants_follow(self) -> Optional[Tensor]:
        """The tensor whose dtype and device the constants take: the first
        floating-point parameter (every parameter of these modules shares them)."""
        return next((p for p in self.parameters() if p.is_floating_point()), None)

    def build_constants(self) -> None:
        """(Re)compute the constants in the parameters' dtype and on their device."""
        like = self._constants_follow()
        dtype, device = (like.dtype, like.device) if like is not None else (torch.get_default_dtype(), None)
        for name, value in self.constant_buffers(dtype, device).items():
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value, persistent=False)
        self._constants_built_for = (dtype, device)

    def _apply(self, fn, *args, **kwargs):
        # nn.Module routes every dtype/device conversion through _apply; the
        # constants were just converted with the rest, rebuild them exactly.
        result = super()._apply(fn, *args, **kwargs)
        like = self._constants_follow()
        if like is not None and (like.dtype, like.device) != getattr(self, '_constants_built_for', None):
            self.build_constants()
        return result


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal, NaN where the other has NaN (an unwritten NaN kernel is not a write)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device \
        and bool(((a == b) | (a.isnan() & b.isnan())).all())


class ReparamConv2d(nn.Module):
    """Base of the multi-branch convs that fuse into one ``nn.Conv2d``.

    Subclasses implement :meth:`fused_kernel_bias` (the kernel and bias of the
    equivalent plain conv, eval-mode) and ``forward``.
    """

    #: ``ConvModule`` reads these like it reads ``nn.Conv2d``'s.
    transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                 stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0,
                 dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros') -> None:
        super().__init__()
        name = type(self).__name__
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if kernel_size[0] != kernel_size[1]:
            raise ValueError(f'{name}: non-square kernel_size {kernel_size} is not supported')
        k = kernel_size[0]
        if k < 1 or (k > 1 and k % 2 == 0):
            raise ValueError(f'{name}: kernel_size must be 1 or odd (the branches are centred), got {k}')
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f'{name}: stride and dilation must be >= 1, got {stride}, {dilation}')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'{name}: in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must be divisible by groups ({groups})')
        if padding_mode not in PADDING_MODES:
            raise ValueError(f'{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}')
        if isinstance(padding, str):
            if padding == 'valid':
                padding = 0
            elif padding == 'same':
                if max(stride) != 1:
                    raise ValueError(f"{name}: padding='same' needs stride 1, got {stride}")
                padding = (dilation[0] * (k // 2), dilation[1] * (k // 2))
            else:
                raise ValueError(f"{name}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        padding = _pair(padding)
        if min(padding) < 0:
            raise ValueError(f'{name}: padding must be >= 0, got {padding}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.output_padding = (0, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter('bias', None)
        #: The last kernel handed out by :attr:`weight` and a copy of its values then.
        self._weight_handout: Optional[Tuple[Tensor, Tensor]] = None

    # -- helpers for subclasses -------------------------------------------------
    def _pad_input(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Apply a non-zero padding mode up front; returns (input, conv padding)."""
        if self.padding_mode == 'zeros':
            return x, self.padding
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)

    def reset_bias(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- initialisers: writes into ``weight`` ----------------------------------------
    def current_kernel(self) -> Tensor:
        """The kernel of the equivalent plain conv now (what :attr:`weight` hands out)."""
        raise NotImplementedError

    def load_plain_kernel(self, kernel: Tensor) -> None:
        """Make the layer compute the plain conv ``kernel``: the origin branch
        holds it, every other branch is switched off (their parameters are
        kept, so they start learning once their scales move off zero)."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The kernel the layer applies now (derived from the branches, not a parameter).

        Writing into the returned tensor, in place as mmengine's initialisers
        do (``normal_init``, ``constant_init``, ``kaiming_init``,
        ``xavier_init``, ``init_cfg`` with ``layer=`` or ``override=``),
        through ``.data`` (``weight.data.normal_()``) or by replacing its data
        (``weight.data = kernel``, as some re-param blocks' own
        ``switch_to_deploy`` do), is not lost: before the layer is next used
        (forward, ``weight``, ``state_dict``, ``load_state_dict``, ``fuse``,
        ``train``/``eval``, copying) the written kernel is loaded with
        :meth:`load_plain_kernel`, so the layer becomes exactly that conv.
        """
        self.apply_weight_writes()
        kernel = self.current_kernel()
        # The values are compared, not the version counter: a write through
        # ``.data`` bumps no counter of the handed-out tensor.
        self._weight_handout = (kernel, kernel.detach().clone())
        return kernel

    def apply_weight_writes(self) -> None:
        """Load the kernel last handed out by :attr:`weight` if it was written to since."""
        handout, self._weight_handout = self._weight_handout, None
        if handout is None:
            return
        kernel, values = handout
        if not _same_values(kernel.detach(), values):  # shape, dtype, device or values (.data = ... too)
            if kernel.shape != values.shape:
                raise ValueError(f'{type(self).__name__}.weight was given the shape {tuple(kernel.shape)}; '
                                 f'the layer computes a {tuple(values.shape)} kernel')
            with torch.no_grad():
                self.load_plain_kernel(kernel.detach().to(values.dtype))

    def train(self, mode: bool = True) -> 'ReparamConv2d':
        self.apply_weight_writes()
        return super().train(mode)

    def __getstate__(self):
        self.apply_weight_writes()
        state = super().__getstate__().copy()
        state['_weight_handout'] = None
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.apply_weight_writes()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.apply_weight_writes()  # an earlier initialisation first: the checkpoint's values win
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- fusing -----------------------------------------------------------------
    def fused_kernel_bias(self) -> Tuple[Tensor, Tensor | None]:
        """Kernel and bias (``None`` if there is none) of the equivalent conv."""
        raise NotImplementedError

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """Return the plain ``nn.Conv2d`` that computes this layer in eval mode."""
        self.apply_weight_writes()
        kernel, bias = self.fused_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=bias is not None,
                         padding_mode=self.padding_mode, device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def init_weights(self) -> None:
        """Keep the designed initialisation.

        ``ConvModule`` and mmengine's ``BaseModule.init_weights`` call this
        instead of running their Kaiming initialiser on the layer, which would
        destroy the branch design; the parameters are initialised at
        construction (see ``reset_parameters``).  An initialiser aimed at the
        layer itself (``init_cfg=dict(..., layer='OREPAConv2d')``, an
        ``override=dict(name=...)``, ``normal_init(layer)``...) writes
        :attr:`weight` and so replaces the design with that conv.  mmengine
        matches ``layer=`` against the class name and its direct bases only:
        ``layer='Conv2d'`` (a backbone's default Kaiming) does not select these
        layers, ``'OREPAConv2d'``, ``'DBBConv2d'`` or ``'ReparamConv2d'`` do.
        """

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode!r}'
        return s
