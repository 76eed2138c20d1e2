"""Super blocks: the searchable units of a structure string.

Each super block expands into basic blocks (:mod:`.blocks`) the way the original PlainNet builds it, and its
counting is the sum over that expansion. ``sub_layers`` repeats the unit; the first repetition carries the
stride and the input channels.

=============================  =============================================================================
``SuperConvK{1,3,5,7}BNRELU``  ``(in,out,stride,sub_layers)``: [KxK conv → BN → ReLU] × sub_layers
``SuperResK{3,5,7}K{3,5,7}``   ``(in,out,stride,bottleneck,sub_layers)``: ResNet basic block
                               [KxK conv(in→btl) → BN → ReLU (→ SE) → KxK conv(btl→out) → BN] + shortcut,
                               then ReLU; × sub_layers (kernel pairs K3K3, K5K5, K7K7 only)
``SuperResK1K{3,5,7}K1``       same signature: *two* bottleneck blocks per sub-layer, each
                               [1x1 → BN → ReLU → KxK → BN → ReLU (→ SE) → 1x1 → BN] + shortcut, then ReLU
``SuperResIDWE{1,2,4,6}K{3,5,7}``  same signature: *two* inverted-residual (MobileNetV2) blocks per sub-layer,
                               expansion E, depthwise KxK; the first maps to ``bottleneck`` channels, the
                               second to ``out`` (its hidden width is ``smart_round(out·E, 8)``)
=============================  =============================================================================

The first residual unit of a super block always has a projection shortcut; later ones get one only when
their input and output channels differ. With ``no_reslink`` the shortcuts are dropped (as the search builds
networks for scoring), with ``no_BN`` the BatchNorms, with ``use_se`` an SE gate follows the KxK ReLU of
the residual super blocks (``SuperConv*`` ignore ``use_se``, as in the original).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .blocks import BN, RELU, SE, ConvDW, ConvKX, ResBlock, ResBlockProj
from .grammar import DEFAULT_OPTIONS, BlockSpec, BuildOptions, register_block, smart_round

__all__ = [
    "SuperBlock",
    "SuperBlockModule",
    "SuperConvKXBNRELU",
    "SuperResIDWEXKX",
    "SuperResK1KXK1",
    "SuperResKXKX",
    "SuperResBlock",
]


class SuperBlockModule(nn.Module):
    """The module of one super block: its expanded layers, applied in order."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SuperBlock(BlockSpec):
    """Base of super blocks: define ``expand(opts) -> list[BlockSpec]``; counting and building follow.

    Subclasses are frozen dataclasses with (at least) ``in_channels``, ``out_channels``, ``stride`` and
    ``sub_layers`` fields.
    """

    def expand(self, opts: BuildOptions = DEFAULT_OPTIONS) -> list[BlockSpec]:
        raise NotImplementedError

    def out_resolution(self, res):
        for b in self.expand(DEFAULT_OPTIONS):
            res = b.out_resolution(res)
        return res

    def flops(self, res, opts=DEFAULT_OPTIONS):
        total = 0.0
        for b in self.expand(opts):
            total += b.flops(res, opts)
            res = b.out_resolution(res)
        return total

    def params(self, opts=DEFAULT_OPTIONS):
        return sum(b.params(opts) for b in self.expand(opts))

    def num_layers(self):
        return self.sub_layers

    def build(self, opts=DEFAULT_OPTIONS):
        return SuperBlockModule([b.build(opts) for b in self.expand(opts)])

    def split(self, threshold: int = 6) -> list["SuperBlock"]:
        """The original's ``split``: a block with ``sub_layers >= threshold`` becomes two blocks (default: itself)."""
        return [self]


@dataclass(frozen=True)
class SuperConvKXBNRELU(SuperBlock):
    """``SuperConvK{K}BNRELU(in,out,stride,sub_layers)``: [KxK conv → BN → ReLU] × sub_layers."""

    in_channels: int
    out_channels: int
    stride: int
    sub_layers: int
    kernel_size: ClassVar[int] = 3

    def __post_init__(self):
        self._check_positive("in_channels", "out_channels", "stride", "sub_layers")

    def expand(self, opts=DEFAULT_OPTIONS):
        layers: list[BlockSpec] = []
        c_in, stride = self.in_channels, self.stride
        for _ in range(self.sub_layers):
            layers.append(ConvKX(c_in, self.out_channels, self.kernel_size, stride))
            if not opts.no_BN:
                layers.append(BN(self.out_channels))
            layers.append(RELU(self.out_channels))
            c_in, stride = self.out_channels, 1
        return layers


@dataclass(frozen=True)
class SuperResBlock(SuperBlock):
    """Base of the residual super blocks: ``(in,out,stride,bottleneck_channels,sub_layers)``."""

    in_channels: int
    out_channels: int
    stride: int
    bottleneck_channels: int
    sub_layers: int
    kernel_size: ClassVar[int] = 3

    def __post_init__(self):
        self._check_positive("in_channels", "out_channels", "stride", "bottleneck_channels", "sub_layers")

    def split(self, threshold=6):
        if self.sub_layers < threshold:
            return [self]
        first = threshold // 2
        return [dataclasses.replace(self, sub_layers=first, label=None),
                dataclasses.replace(self, in_channels=self.out_channels, stride=1,
                                    sub_layers=self.sub_layers - first, label=None)]

    @staticmethod
    def _unit(body: list[BlockSpec], out_channels: int, first: bool, opts: BuildOptions) -> list[BlockSpec]:
        """A residual unit followed by its ReLU (or the bare body when residual links are off)."""
        if opts.no_reslink:
            return body + [RELU(out_channels)]
        wrapper = ResBlockProj if first else ResBlock
        return [wrapper(tuple(body)), RELU(out_channels)]

    @staticmethod
    def _bn(channels: int, opts: BuildOptions) -> list[BlockSpec]:
        return [] if opts.no_BN else [BN(channels)]


@dataclass(frozen=True)
class SuperResKXKX(SuperResBlock):
    """``SuperResK{K}K{K}(in,out,stride,bottleneck,sub_layers)``: ResNet basic blocks."""

    def expand(self, opts=DEFAULT_OPTIONS):
        k, btl, out = self.kernel_size, self.bottleneck_channels, self.out_channels
        layers: list[BlockSpec] = []
        c_in, stride = self.in_channels, self.stride
        for i in range(self.sub_layers):
            body = [ConvKX(c_in, btl, k, stride), *self._bn(btl, opts), RELU(btl)]
            if opts.use_se:
                body.append(SE(btl))
            body += [ConvKX(btl, out, k, 1), *self._bn(out, opts)]
            layers += self._unit(body, out, i == 0, opts)
            c_in, stride = out, 1
        return layers


@dataclass(frozen=True)
class SuperResK1KXK1(SuperResBlock):
    """``SuperResK1K{K}K1(in,out,stride,bottleneck,sub_layers)``: two ResNet bottleneck blocks per sub-layer."""

    def _bottleneck(self, c_in: int, stride: int, opts: BuildOptions) -> list[BlockSpec]:
        k, btl, out = self.kernel_size, self.bottleneck_channels, self.out_channels
        body = [ConvKX(c_in, btl, 1, 1), *self._bn(btl, opts), RELU(btl),
                ConvKX(btl, btl, k, stride), *self._bn(btl, opts), RELU(btl)]
        if opts.use_se:
            body.append(SE(btl))
        body += [ConvKX(btl, out, 1, 1), *self._bn(out, opts)]
        return body

    def expand(self, opts=DEFAULT_OPTIONS):
        out = self.out_channels
        layers: list[BlockSpec] = []
        c_in, stride = self.in_channels, self.stride
        for i in range(self.sub_layers):
            layers += self._unit(self._bottleneck(c_in, stride, opts), out, i == 0, opts)
            layers += self._unit(self._bottleneck(out, 1, opts), out, False, opts)
            c_in, stride = out, 1
        return layers


@dataclass(frozen=True)
class SuperResIDWEXKX(SuperResBlock):
    """``SuperResIDWE{E}K{K}(in,out,stride,bottleneck,sub_layers)``: two inverted-residual blocks per sub-layer."""

    expansion: ClassVar[float] = 1.0

    def _inverted(self, c_in: int, c_out: int, hidden_of: int, stride: int, opts: BuildOptions) -> list[BlockSpec]:
        k = self.kernel_size
        hidden = smart_round(hidden_of * self.expansion, base=8)
        body = [ConvKX(c_in, hidden, 1, 1), *self._bn(hidden, opts), RELU(hidden),
                ConvDW(hidden, k, stride), *self._bn(hidden, opts), RELU(hidden)]
        if opts.use_se:
            body.append(SE(hidden))
        body += [ConvKX(hidden, c_out, 1, 1), *self._bn(c_out, opts)]
        return body

    def expand(self, opts=DEFAULT_OPTIONS):
        btl, out = self.bottleneck_channels, self.out_channels
        layers: list[BlockSpec] = []
        c_in, stride = self.in_channels, self.stride
        for i in range(self.sub_layers):
            layers += self._unit(self._inverted(c_in, btl, btl, stride, opts), out, i == 0, opts)
            layers += self._unit(self._inverted(btl, out, out, 1, opts), out, False, opts)
            c_in, stride = out, 1
        return layers


def _define(base: type[SuperBlock], name: str, doc: str, **class_vars) -> type[SuperBlock]:
    cls = type(name, (base,), {"__doc__": doc, "__module__": __name__, **class_vars})
    globals()[name] = cls
    __all__.append(name)
    return register_block(cls)


for _k in (1, 3, 5, 7):
    _define(SuperConvKXBNRELU, f"SuperConvK{_k}BNRELU",
            f"``SuperConvK{_k}BNRELU(in,out,stride,sub_layers)``: [{_k}x{_k} conv → BN → ReLU] × sub_layers.",
            kernel_size=_k)
for _k in (3, 5, 7):
    _define(SuperResKXKX, f"SuperResK{_k}K{_k}",
            f"``SuperResK{_k}K{_k}(in,out,stride,bottleneck,sub_layers)``: ResNet basic blocks, {_k}x{_k} kernels.",
            kernel_size=_k)
    _define(SuperResK1KXK1, f"SuperResK1K{_k}K1",
            f"``SuperResK1K{_k}K1(in,out,stride,bottleneck,sub_layers)``: ResNet bottlenecks, {_k}x{_k} middle conv.",
            kernel_size=_k)
for _k in (3, 5, 7):
    for _e in (1, 2, 4, 6):
        _define(SuperResIDWEXKX, f"SuperResIDWE{_e}K{_k}",
                f"``SuperResIDWE{_e}K{_k}(in,out,stride,bottleneck,sub_layers)``: inverted residuals, "
                f"expansion {_e}, depthwise {_k}x{_k}.",
                kernel_size=_k, expansion=float(_e))
del _k, _e
