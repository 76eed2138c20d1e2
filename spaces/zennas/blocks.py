"""Basic blocks of the grammar (convolutions, BN, activations, residual wrappers) and their modules.

Counting follows the original PlainNet ``basic_blocks`` exactly, including its quirks, because search
budgets are checked with these numbers:

* FLOPs are multiply-adds on the resolution the counting tracks (``res // stride``, not the padded
  convolution output), BN counts ``res² · C`` and its parameters as ``C``;
* a residual projection (1x1 conv + BN) counts ``in·out + out`` parameters and
  ``(in·out + out) · (res_out / stride)²`` FLOPs, ``res_out`` being the resolution *after* the body (so a
  strided projection is counted at a quarter of its cost, as a float);
* SE counts its two 1x1 convs, its gating multiply and two BN scale/shift pairs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from retia.errors import RetiaError

from .grammar import DEFAULT_OPTIONS, BlockSpec, BuildOptions, parse_list, register_block

__all__ = [
    "BN",
    "ConvDW",
    "ConvKX",
    "ConvKXG2",
    "ConvKXG4",
    "ConvKXG8",
    "ConvKXG16",
    "ConvKXG32",
    "MaxPool",
    "RELU",
    "ResBlock",
    "ResBlockProj",
    "Residual",
    "SE",
    "Sequential",
    "SequentialBlock",
    "SqueezeExcite",
    "Swish",
]


# ---- modules ----------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate: GAP → 1x1 conv → BN → ReLU → 1x1 conv → BN → sigmoid, times the input."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, se_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(se_channels)
        self.expand = nn.Conv2d(se_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.mean(x, dim=(2, 3), keepdim=True)
        g = torch.relu(self.bn1(self.reduce(g)))
        g = torch.sigmoid(self.bn2(self.expand(g)))
        return g * x


class Residual(nn.Module):
    """``body(x) + shortcut(x)``; the shortcut is ``proj`` (1x1 conv with bias + BN) or the identity."""

    def __init__(self, body: Sequence[nn.Module], proj: nn.Module | None):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return out + (x if self.proj is None else self.proj(x))


class SequentialBlock(nn.Module):
    """A plain chain of layers (the ``Sequential(...)`` token)."""

    def __init__(self, body: Sequence[nn.Module]):
        super().__init__()
        self.body = nn.ModuleList(body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.body:
            x = layer(x)
        return x


# ---- atomic blocks ---------------------------------------------------------------------------------------


@register_block
@dataclass(frozen=True)
class ConvKX(BlockSpec):
    """``ConvKX(in,out,kernel,stride)``: a KxK convolution without bias, padding (K-1)//2."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: ClassVar[int] = 1

    def __post_init__(self):
        self._check_positive("in_channels", "out_channels", "kernel_size", "stride")

    def flops(self, res, opts=DEFAULT_OPTIONS):
        k2 = self.kernel_size ** 2
        return self.in_channels * self.out_channels * k2 * res ** 2 // self.stride ** 2 // self.groups

    def params(self, opts=DEFAULT_OPTIONS):
        return self.in_channels * self.out_channels * self.kernel_size ** 2 // self.groups

    def build(self, opts=DEFAULT_OPTIONS):
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise RetiaError(f"bad structure token {self.to_string()!r}: channels must be divisible by {self.groups}")
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         padding=(self.kernel_size - 1) // 2, groups=self.groups, bias=False)


def _grouped(groups: int) -> type[ConvKX]:
    cls = type(f"ConvKXG{groups}", (ConvKX,), {
        "groups": groups,
        "__doc__": f"``ConvKXG{groups}(in,out,kernel,stride)``: ConvKX with {groups} groups.",
        "__module__": __name__,
    })
    return register_block(cls)


ConvKXG2 = _grouped(2)
ConvKXG4 = _grouped(4)
ConvKXG8 = _grouped(8)
ConvKXG16 = _grouped(16)
ConvKXG32 = _grouped(32)


class _OneChannelBlock(BlockSpec):
    """Blocks whose only channel argument is ``channels`` (in = out)."""

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels

    def __post_init__(self):
        self._check_positive(*self.arg_names())

    def with_in_channels(self, channels: int) -> BlockSpec:
        return dataclasses.replace(self, channels=channels)

    def out_resolution(self, res):
        return res

    def flops(self, res, opts=DEFAULT_OPTIONS):
        return 0

    def params(self, opts=DEFAULT_OPTIONS):
        return 0


@register_block
@dataclass(frozen=True)
class ConvDW(_OneChannelBlock):
    """``ConvDW(channels,kernel,stride)``: depthwise KxK convolution without bias."""

    channels: int
    kernel_size: int
    stride: int

    def out_resolution(self, res):
        return res // self.stride

    def flops(self, res, opts=DEFAULT_OPTIONS):
        return self.channels * self.kernel_size ** 2 * res ** 2 // self.stride ** 2

    def params(self, opts=DEFAULT_OPTIONS):
        return self.channels * self.kernel_size ** 2

    def build(self, opts=DEFAULT_OPTIONS):
        return nn.Conv2d(self.channels, self.channels, self.kernel_size, self.stride,
                         padding=(self.kernel_size - 1) // 2, groups=self.channels, bias=False)


@register_block
@dataclass(frozen=True)
class BN(_OneChannelBlock):
    """``BN(channels)``: BatchNorm2d (counted as ``res²·C`` FLOPs and ``C`` parameters)."""

    channels: int
    stride: ClassVar[int] = 1

    def flops(self, res, opts=DEFAULT_OPTIONS):
        return res ** 2 * self.channels

    def params(self, opts=DEFAULT_OPTIONS):
        return self.channels

    def build(self, opts=DEFAULT_OPTIONS):
        return nn.BatchNorm2d(self.channels)


@register_block
@dataclass(frozen=True)
class RELU(_OneChannelBlock):
    """``RELU(channels)``: ReLU (free in the counting)."""

    channels: int
    stride: ClassVar[int] = 1

    def build(self, opts=DEFAULT_OPTIONS):
        return nn.ReLU()


@register_block
@dataclass(frozen=True)
class Swish(_OneChannelBlock):
    """``Swish(channels)``: x·sigmoid(x) (counted as ``res²·C`` FLOPs)."""

    channels: int
    stride: ClassVar[int] = 1

    def flops(self, res, opts=DEFAULT_OPTIONS):
        return self.channels * res ** 2

    def build(self, opts=DEFAULT_OPTIONS):
        return nn.SiLU()


@register_block
@dataclass(frozen=True)
class SE(_OneChannelBlock):
    """``SE(channels)``: squeeze-and-excitation with ratio 0.25 (``max(1, round(C/4))`` hidden channels)."""

    channels: int
    stride: ClassVar[int] = 1

    @property
    def se_channels(self) -> int:
        return max(1, int(round(self.channels * 0.25)))

    def flops(self, res, opts=DEFAULT_OPTIONS):
        c, s = self.channels, self.se_channels
        return c * s + s * c + c + c * res ** 2

    def params(self, opts=DEFAULT_OPTIONS):
        c, s = self.channels, self.se_channels
        return c * s + 2 * s + s * c + 2 * c

    def build(self, opts=DEFAULT_OPTIONS):
        return SqueezeExcite(self.channels, self.se_channels)


@register_block
@dataclass(frozen=True)
class MaxPool(_OneChannelBlock):
    """``MaxPool(channels,kernel,stride)``: max pooling, padding (K-1)//2 (free in the counting)."""

    channels: int
    kernel_size: int
    stride: int

    def out_resolution(self, res):
        return res // self.stride

    def build(self, opts=DEFAULT_OPTIONS):
        return nn.MaxPool2d(self.kernel_size, self.stride, padding=(self.kernel_size - 1) // 2)


# ---- composite blocks --------------------------------------------------------------------------------------


def _chain_resolution(body: Sequence[BlockSpec], res: int) -> int:
    for b in body:
        res = b.out_resolution(res)
    return res


def _chain_flops(body: Sequence[BlockSpec], res: int, opts: BuildOptions) -> float:
    total = 0
    for b in body:
        total += b.flops(res, opts)
        res = b.out_resolution(res)
    return total


class _BodyBlock(BlockSpec):
    """Composite tokens: ``Name([in,[stride,]]block block ...)``."""

    @classmethod
    def from_args(cls, text, *, label, token):
        given_in = given_stride = None
        first = text.find(",")
        if first > 0 and text[:first].isdigit():
            given_in = int(text[:first])
            text = text[first + 1:]
            second = text.find(",")
            if second > 0 and text[:second].isdigit():
                given_stride = int(text[:second])
                text = text[second + 1:]
        if not text:
            raise RetiaError(f"bad structure token {token!r}: {cls.token_name()} needs at least one inner block")
        body = tuple(parse_list(text))
        return cls(body, given_in, given_stride, label=label)

    def args_to_string(self):
        head = ""
        if self.given_in_channels is not None:
            head += f"{self.given_in_channels},"
            if self.given_stride is not None:
                head += f"{self.given_stride},"
        return head + "".join(b.to_string() for b in self.body)

    def __post_init__(self):
        if not self.body:
            raise RetiaError(f"{self.token_name()} needs at least one inner block")

    @property
    def in_channels(self) -> int:
        return self.body[0].in_channels if self.given_in_channels is None else self.given_in_channels

    @property
    def out_channels(self) -> int:
        return self.body[-1].out_channels

    @property
    def stride(self) -> int:
        if self.given_stride is not None:
            return self.given_stride
        return 1024 // _chain_resolution(self.body, 1024)

    def out_resolution(self, res):
        return _chain_resolution(self.body, res)

    def with_in_channels(self, channels):
        body = (self.body[0].with_in_channels(channels),) + self.body[1:]
        given_in = None if self.given_in_channels is None else channels
        return dataclasses.replace(self, body=body, given_in_channels=given_in)


@register_block
@dataclass(frozen=True)
class Sequential(_BodyBlock):
    """``Sequential(block block ...)``: the inner blocks in a chain."""

    body: tuple[BlockSpec, ...]
    given_in_channels: int | None = None
    given_stride: int | None = None

    @classmethod
    def from_args(cls, text, *, label, token):
        if not text:
            raise RetiaError(f"bad structure token {token!r}: Sequential needs at least one inner block")
        return cls(tuple(parse_list(text)), label=label)

    def args_to_string(self):
        return "".join(b.to_string() for b in self.body)

    def flops(self, res, opts=DEFAULT_OPTIONS):
        return _chain_flops(self.body, res, opts)

    def params(self, opts=DEFAULT_OPTIONS):
        return sum(b.params(opts) for b in self.body)

    def build(self, opts=DEFAULT_OPTIONS):
        return SequentialBlock([b.build(opts) for b in self.body])


@register_block
@dataclass(frozen=True)
class ResBlock(_BodyBlock):
    """``ResBlock([in,[stride,]]body...)``: body + shortcut; a 1x1 projection when stride > 1 or in != out."""

    body: tuple[BlockSpec, ...]
    given_in_channels: int | None = None
    given_stride: int | None = None
    always_project: ClassVar[bool] = False

    @property
    def has_proj(self) -> bool:
        return self.always_project or self.stride > 1 or self.in_channels != self.out_channels

    def flops(self, res, opts=DEFAULT_OPTIONS):
        total = 0
        for b in self.body:
            total += b.flops(res, opts)
            res = b.out_resolution(res)
        if self.has_proj:
            # the original evaluates the projection at (output resolution / stride)²
            r = res / self.stride
            total += self.in_channels * self.out_channels * r ** 2 + r ** 2 * self.out_channels
        return total

    def params(self, opts=DEFAULT_OPTIONS):
        total = sum(b.params(opts) for b in self.body)
        if self.has_proj:
            total += self.in_channels * self.out_channels + self.out_channels
        return total

    def build(self, opts=DEFAULT_OPTIONS):
        proj = None
        if self.has_proj:
            proj = nn.Sequential(nn.Conv2d(self.in_channels, self.out_channels, 1, self.stride),
                                 nn.BatchNorm2d(self.out_channels))
        return Residual([b.build(opts) for b in self.body], proj)


@register_block
@dataclass(frozen=True)
class ResBlockProj(ResBlock):
    """``ResBlockProj(...)``: like ResBlock but always with the 1x1 projection shortcut."""

    always_project: ClassVar[bool] = True
