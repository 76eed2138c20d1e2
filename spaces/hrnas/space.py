"""HR-NAS as an NNI model space, and the original's ``best_model.json`` format.

Design: every arch key (``<block>.k<kernel>``, ``<block>.tokens``) is one NNI ``Categorical`` whose values run
from the supernet's maximum down to 0 — so NNI's default (first value) is the supernet, an NNI sample *is* an
arch dict, and ``space.freeze(arch)`` is the plain :class:`~retia.spaces.hrnas.network.HRNet` of that arch with
weights sliced from the space's network (its first channels / tokens, once-for-all style). Progressive shrinking
does not sample: it trains ``space.network`` and replaces it with ever smaller plain networks; at the end
``space.network`` is the searched network, so ``space.freeze(searched_arch)`` returns it (copied) and any
smaller arch is sliced from it. Categorical (not a numeric range) keeps every NNI strategy and the sample
validation working unchanged; the cost is a long value list per key, which nothing enumerates.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from nni.mutable import Categorical, ensure_frozen
from nni.nas.nn.pytorch import ModelSpace

from ...errors import RetiaError
from . import network as net

__all__ = ["HRNASSpace", "resolve_config", "to_best_model", "from_best_model", "tokens_list",
           "write_best_model", "read_best_model"]


def resolve_config(config: Mapping[str, Any] | str | None = None, **overrides: Any) -> dict[str, Any]:
    """A full config from a preset name (default ``tiny``) or a config dict, with ``overrides``."""
    if config is None:
        config = "tiny"
    if isinstance(config, str):
        return net.preset(config, **overrides)
    if not isinstance(config, Mapping):
        raise RetiaError(f"HR-NAS config: expected a preset name ({', '.join(net.PRESETS)}) or a dict, "
                         f"got {type(config).__name__}")
    return net.make_config(**dict(config, **overrides))


class HRNASSpace(ModelSpace):
    """The HR-NAS supernet as an NNI model space (see the module docstring).

    ``HRNASSpace("cpu")``, ``HRNASSpace("tiny", width_mult=0.25)``, ``HRNASSpace({"task": "segmentation", ...})``.
    """

    def __init__(self, config: Mapping[str, Any] | str | None = None, **overrides: Any):
        super().__init__()
        cfg = resolve_config(config, **overrides)
        self.config = cfg
        self.choices = net.arch_choices(cfg)
        arch = {}
        for key, maximum in self.choices.items():
            mutable = self.add_mutable(Categorical(list(range(maximum, -1, -1)), label=key))
            arch[key] = ensure_frozen(mutable, strict=False)
        self.network = net.HRNet(cfg, arch)

    @classmethod
    def create_fixed_module(cls, sample: dict, config: Mapping[str, Any] | str | None = None, **overrides: Any):
        cfg = resolve_config(config, **overrides)
        return net.HRNet(cfg, {k: sample[k] for k in net.arch_choices(cfg) if k in sample})

    def freeze(self, sample: Mapping[str, Any]) -> net.HRNet:
        """The plain network of ``sample`` (an arch dict) with weights sliced from :attr:`network`."""
        arch = net.check_arch(self.config, {k: sample[k] for k in sample if k in self.choices})
        return net.subnet(self.network, arch)

    def forward(self, x):
        return self.network(x)

    # conveniences ---------------------------------------------------------------------------------------------
    def full_arch(self) -> dict[str, int]:
        return dict(self.choices)

    def count_macs(self, arch: Mapping[str, Any] | None = None) -> int:
        return net.count_macs(self.config, arch)


# ---------------------------------------------------------------------------------------------------------------
# the original's best_model.json
# ---------------------------------------------------------------------------------------------------------------
def to_best_model(config: Mapping[str, Any], arch: Mapping[str, Any]) -> list[list[Any]]:
    """``arch`` as the original's ``inverted_residual_setting`` (its ``best_model.json``): one
    ``[out_channels, 1, stride, kernel_sizes, channels, expand]`` per block, in block order, with the removed
    kernel branches left out. Token counts are not part of that format: see :func:`tokens_list`."""
    arch = net.check_arch(config, arch)
    out = []
    for spec in net.layout(config).blocks:
        chans = net.block_channels(config, arch, spec.name)
        ks = [k for k, c in zip(config["kernel_sizes"], chans) if c > 0]
        out.append([spec.oup, 1, spec.stride, ks, [c for c in chans if c > 0], True])
    return out


def tokens_list(config: Mapping[str, Any], arch: Mapping[str, Any]) -> list[int]:
    """Tokens of every transformer in block order (the original's separate ``transformer_dict`` list)."""
    arch = net.check_arch(config, arch)
    return [int(arch[f"{s.name}.tokens"]) for s in net.layout(config).blocks if s.transformer]


def from_best_model(config: Mapping[str, Any], setting: Sequence[Any] | Mapping[str, Any],
                    tokens: Sequence[int] | Mapping[str, int] | None = None) -> dict[str, int]:
    """The arch dict of an ``inverted_residual_setting`` list (or a dict holding one under that key).
    ``tokens``: a list in transformer order (:func:`tokens_list`), an arch-style dict, or None for the
    supernet's maximum."""
    if isinstance(setting, Mapping):
        if "inverted_residual_setting" not in setting:
            raise RetiaError("best_model: expected a list or a dict with 'inverted_residual_setting'")
        setting = setting["inverted_residual_setting"]
    specs = net.layout(config).blocks
    if not isinstance(setting, (list, tuple)) or len(setting) != len(specs):
        n = len(setting) if isinstance(setting, (list, tuple)) else type(setting).__name__
        raise RetiaError(f"best_model: {n} blocks, expected {len(specs)} for this config")
    kernels = list(config["kernel_sizes"])
    arch: dict[str, int] = {}
    for i, (spec, entry) in enumerate(zip(specs, setting)):
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 5):
            raise RetiaError(f"best_model block {i} {entry!r}: expected [out, 1, stride, kernels, channels, expand]")
        oup, _, stride, ks, chans = entry[:5]
        if oup != spec.oup or stride != spec.stride:
            raise RetiaError(f"best_model block {i} ({spec.name}): out/stride {oup}/{stride}, expected "
                             f"{spec.oup}/{spec.stride} for this config")
        if len(ks) != len(chans) or any(k not in kernels for k in ks):
            raise RetiaError(f"best_model block {i} ({spec.name}): kernels {ks} / channels {chans}: expected "
                             f"matching lists of kernels from {kernels}")
        per_k = dict(zip(ks, chans))
        for k in kernels:
            arch[f"{spec.name}.k{k}"] = int(per_k.get(k, 0))
    t_specs = [s for s in specs if s.transformer]
    if tokens is None:
        for s in t_specs:
            arch[f"{s.name}.tokens"] = int(config["max_tokens"])
    elif isinstance(tokens, Mapping):
        for s in t_specs:
            arch[f"{s.name}.tokens"] = tokens.get(f"{s.name}.tokens", tokens.get(s.name))
    else:
        if len(tokens) != len(t_specs):
            raise RetiaError(f"best_model tokens: {len(tokens)} values, expected {len(t_specs)} (one per transformer)")
        for s, n in zip(t_specs, tokens):
            arch[f"{s.name}.tokens"] = n
    return net.check_arch(config, arch)


def write_best_model(path: str | Path, config: Mapping[str, Any], arch: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_best_model(config, arch)) + "\n")
    return path


def read_best_model(path: str | Path, config: Mapping[str, Any],
                    tokens: Sequence[int] | Mapping[str, int] | None = None) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise RetiaError(f"best_model file {str(path)!r} does not exist")
    try:
        setting = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RetiaError(f"best_model file {str(path)!r} is not JSON ({exc.msg})") from None
    return from_best_model(config, setting, tokens)
