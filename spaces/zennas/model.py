"""The network a structure string describes (``ZenNet``), its counting (``analyze``) and official-weight loading.

``ZenNet`` = the blocks of the string → global average pool → linear classifier, as the original
``Masternet.MasterNet`` / ``ZenNet.masternet.PlainNet``: every BatchNorm has ``eps=1e-3``, optional dropout
grows linearly over the blocks (``p = i / n_blocks · dropout`` after block ``i``, and ``dropout`` before the
classifier, in training only).
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retia.errors import RetiaError

from .blocks import Residual, SequentialBlock, SqueezeExcite
from .grammar import BlockSpec, BuildOptions, parse, to_string
from .super_blocks import SuperBlockModule

__all__ = [
    "ZenNet",
    "analyze",
    "build",
    "check_channels",
    "load_official_weights",
    "num_layers",
    "official_key_map",
]

BN_EPS = 1e-3


def _specs(structure: str | Sequence[BlockSpec]) -> list[BlockSpec]:
    return parse(structure)


def check_channels(structure: str | Sequence[BlockSpec]) -> list[BlockSpec]:
    """Parse and check that every block takes the channels its predecessor gives (``RetiaError`` otherwise)."""
    specs = _specs(structure)
    for prev, cur in zip(specs, specs[1:]):
        if cur.in_channels != prev.out_channels:
            raise RetiaError(
                f"bad structure: {cur.to_string()!r} takes {cur.in_channels} input channels but "
                f"{prev.to_string()!r} gives {prev.out_channels}"
            )
    return specs


def num_layers(structure: str | Sequence[BlockSpec]) -> int:
    """Layers as the original's ``get_num_layers`` counts them: the sum of the super blocks' ``sub_layers``.

    A basic block at the top level (outside the original's search spaces) adds its own ``num_layers()``
    (0 for the built-in ones).
    """
    return sum(b.num_layers() for b in _specs(structure))


@functools.lru_cache(maxsize=65536)
def _block_cost(block: BlockSpec, res: int, opts: BuildOptions) -> tuple[float, int, int]:
    """(flops, params, output resolution) of one block; cached, as a search counts the same blocks again and again."""
    return block.flops(res, opts), block.params(opts), block.out_resolution(res)


def _count(specs: Sequence[BlockSpec], resolution: int, num_classes: int, opts: BuildOptions) -> dict[str, Any]:
    flops: float = 0
    params = 0
    res = resolution
    for b in specs:
        f, p, res = _block_cost(b, res, opts)
        flops += f
        params += p
    last = specs[-1].out_channels
    flops += last * num_classes                       # the classifier (GAP is free)
    params += last * num_classes + 1                  # the original counts 1 for the classifier's bias
    return {"params": int(params), "flops": float(flops), "layers": int(sum(b.num_layers() for b in specs))}


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RetiaError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def analyze(structure: str | Sequence[BlockSpec], resolution: int, num_classes: int, *,
            no_BN: bool = False, no_reslink: bool = False, use_se: bool = False) -> dict[str, Any]:
    """Parameters, FLOPs and layers of a structure as the original code counts them.

    Returns ``{"params": int, "flops": float, "layers": int}``, equal to the original's
    ``get_model_size()``, ``get_FLOPs(resolution)`` and ``get_num_layers()`` of ``MasterNet`` built with the
    same options (budgets in the original search are checked with the defaults). FLOPs are multiply-adds,
    BatchNorm and the classifier included; they are a float like the original's (a strided projection
    shortcut can contribute a fraction). The counting follows the original's conventions, which differ from
    ``sum(p.numel())`` of the built model: BatchNorm counts one parameter per channel (the module has two),
    a projection shortcut ``in·out + out`` (the module: conv weight + bias + BN, ``in·out + 3·out``), the
    classifier bias 1 (the module: ``num_classes``); SE counts exactly its parameters.
    """
    _check_int("resolution", resolution)
    _check_int("num_classes", num_classes)
    specs = _specs(structure)
    return _count(specs, resolution, num_classes, BuildOptions(no_BN=no_BN, no_reslink=no_reslink, use_se=use_se))


class ZenNet(nn.Module):
    """A network from a structure string: blocks → global average pool → (dropout) → linear classifier.

    Attributes: ``structure`` (the normalised string), ``specs`` (block specs), ``blocks`` (one module per
    top-level block), ``head`` (``nn.Linear``), ``options`` (:class:`BuildOptions`), ``dropout``.
    """

    def __init__(self, structure: str | Sequence[BlockSpec], num_classes: int = 1000, *, no_BN: bool = False,
                 no_reslink: bool = False, use_se: bool = False, dropout: float | None = None):
        super().__init__()
        _check_int("num_classes", num_classes)
        if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise RetiaError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        specs = check_channels(structure)
        self.specs: list[BlockSpec] = specs
        self.structure: str = to_string(specs)
        self.options = BuildOptions(no_BN=bool(no_BN), no_reslink=bool(no_reslink), use_se=bool(use_se))
        self.num_classes = num_classes
        self.dropout = None if dropout is None else float(dropout)
        self.in_channels = specs[0].in_channels
        self.last_channels = specs[-1].out_channels
        self.blocks = nn.ModuleList([b.build(self.options) for b in specs])
        self.head = nn.Linear(self.last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = BN_EPS

    # ---- forward ----------------------------------------------------------------------------------------
    def forward_pre_GAP(self, x: torch.Tensor) -> torch.Tensor:
        """Features before global average pooling (what the Zen-score reads; no dropout)."""
        for block in self.blocks:
            x = block(x)
        return x

    forward_features = forward_pre_GAP

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(features, 1)
        if self.dropout is not None:
            x = F.dropout(x, self.dropout, training=self.training)
        return self.head(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.dropout is not None:
                x = F.dropout(x, i / n * self.dropout, training=self.training)
        return self.forward_head(x)

    def extract_stage_features_and_logit(self, x: torch.Tensor, target_downsample_ratio: int = 4):
        """Outputs of the first block reaching each downsampling ratio 4, 8, 16, ... and the logits (distillation)."""
        size = x.shape[2]
        features = []
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.dropout is not None:
                x = F.dropout(x, i / n * self.dropout, training=self.training)
            if round(size / x.shape[2]) == target_downsample_ratio:
                features.append(x)
                target_downsample_ratio *= 2
        return features, self.forward_head(x)

    # ---- counting (the original's names are kept for the proxies) -----------------------------------------
    def analyze(self, resolution: int) -> dict[str, Any]:
        return _count(self.specs, resolution, self.num_classes, self.options)

    def get_FLOPs(self, resolution: int) -> float:
        return self.analyze(resolution)["flops"]

    def get_model_size(self) -> int:
        return self.analyze(1)["params"]

    def get_num_layers(self) -> int:
        return sum(b.num_layers() for b in self.specs)

    # ---- initialisation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_parameters(self) -> None:
        """The original's custom init (``--weight_init custom``): Xavier-normal convs with gain 3.26033, normal
        linear weights, unit BN, zero biases, and the last BN of every residual unit's body set to zero."""
        gain = 3.26033
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, gain * math.sqrt(2 / (m.weight.shape[0] + m.weight.shape[1])))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            if not isinstance(block, SuperBlockModule):
                continue
            for unit in block.layers:
                if isinstance(unit, Residual):
                    bns = [m for m in unit.body if isinstance(m, nn.BatchNorm2d)]
                    if bns:
                        nn.init.zeros_(bns[-1].weight)

    def extra_repr(self) -> str:
        return f"structure={self.structure!r}"


def build(structure: str | Sequence[BlockSpec], num_classes: int = 1000, *, no_BN: bool = False,
          no_reslink: bool = False, use_se: bool = False, dropout: float | None = None) -> ZenNet:
    """Build the ``nn.Module`` of a structure string (see :class:`ZenNet`)."""
    return ZenNet(structure, num_classes, no_BN=no_BN, no_reslink=no_reslink, use_se=use_se, dropout=dropout)


# ---- official (idstcv/ZenNAS) state-dict names -----------------------------------------------------------

_LEAF = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_SE_NAMES = {"reduce": "netblock.1", "bn1": "netblock.2", "expand": "netblock.4", "bn2": "netblock.5"}


def _walk(module: nn.Module, ours: str, official: str, out: dict[str, str]) -> None:
    """Map each of our parameter/buffer prefixes to the original's module path."""
    def child(o: str, name: str) -> str:
        return f"{o}.{name}" if o else name

    if isinstance(module, _LEAF):
        out[ours] = official
        return
    if isinstance(module, ZenNet):
        for i, b in enumerate(module.blocks):
            _walk_item(b, child(ours, f"blocks.{i}"), child(official, f"module_list.{i}"), out)
        out[child(ours, "head")] = child(official, "fc_linear.netblock")
        return
    if isinstance(module, SuperBlockModule):
        items, attr = module.layers, "layers"
    elif isinstance(module, (Residual, SequentialBlock)):
        items, attr = module.body, "body"
        if isinstance(module, Residual) and module.proj is not None:
            out[child(ours, "proj.0")] = child(official, "proj.0")
            out[child(ours, "proj.1")] = child(official, "proj.1")
    elif isinstance(module, SqueezeExcite):
        for name, off in _SE_NAMES.items():
            out[child(ours, name)] = child(official, off)
        return
    else:
        return
    for j, m in enumerate(items):
        _walk_item(m, child(ours, f"{attr}.{j}"), child(official, f"module_list.{j}"), out)


def _walk_item(module: nn.Module, ours: str, official: str, out: dict[str, str]) -> None:
    # a basic block of the original wraps its torch layer as ``.netblock``
    if isinstance(module, _LEAF):
        out[ours] = official + ".netblock"
    else:
        _walk(module, ours, official, out)


def official_key_map(model: ZenNet) -> dict[str, str]:
    """``{our state-dict key: the original ZenNAS key}`` for every entry of ``model.state_dict()``.

    The original nests ``module_list`` lists and wraps each torch layer in a block whose layer is ``netblock``:
    ours ``blocks.1.layers.0.body.3.weight`` is theirs ``module_list.1.module_list.0.module_list.3.netblock.weight``;
    ``head.*`` is ``fc_linear.netblock.*``; SE's ``reduce/bn1/expand/bn2`` are ``netblock.1/2/4/5``.
    """
    prefixes: dict[str, str] = {}
    _walk(model, "", "", prefixes)
    mapping = {}
    for key in model.state_dict():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in prefixes:
            raise RuntimeError(f"no official name for {key}")  # a module type _walk does not know
        mapping[key] = f"{prefixes[prefix]}.{leaf}"
    return mapping


def load_official_weights(model: ZenNet, weights: str | Path | Mapping[str, torch.Tensor], *,
                          skip_head: bool = False) -> ZenNet:
    """Load a state dict in the original's naming (``{'state_dict': ...}``, ``module.`` prefixes allowed) or ours.

    A path is read with :func:`retia.weights.load_weights` (``torch.load(weights_only=True)`` for .pth, or
    .safetensors). ``skip_head`` leaves the classifier as it is (for a different number of classes).
    Mismatching keys or shapes raise a one-line :class:`RetiaError`.
    """
    where = "state dict"
    if isinstance(weights, (str, Path)):
        from retia.weights import load_weights

        where = f"weights file {str(weights)!r}"
        state = load_weights(weights)
    elif isinstance(weights, Mapping):
        state = dict(weights)
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = dict(state["state_dict"])
    else:
        raise RetiaError(f"weights must be a path or a state dict, got {type(weights).__name__}")

    state = {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}
    ours = model.state_dict()
    to_official = official_key_map(model)
    if any(k.startswith(("module_list.", "fc_linear.")) for k in state):
        from_official = {v: k for k, v in to_official.items()}
        state = {from_official.get(k, "?" + k): v for k, v in state.items()}
    if skip_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = {k for k in ours if not (skip_head and k.startswith("head."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(k.lstrip("?") for k in set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {to_official.get(missing[0], missing[0])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise RetiaError(f"{where} does not fit {model.structure[:60]}...: " + ", ".join(parts))
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != ours[k].shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise RetiaError(f"{where}: {to_official[k]} has shape {shape}, the model expects {tuple(ours[k].shape)}")
    model.load_state_dict(state, strict=not skip_head)
    return model
