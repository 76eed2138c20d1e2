"""AutoFormer (Chen et al., ICCV 2021) as an NNI model space, with the paper's presets and searched models.

The space is NNI's hub ``AutoFormer`` (labels ``embed_dim``, ``depth``, ``mlp_ratio_i``, ``num_head_i``; head dim
fixed at 64, relative position encoding, weight entanglement through NNI's mixed operations under
``RandomOneShot``). retia adds presets (``tiny``/``small``/``base`` from the paper and a CPU-sized ``micro``),
arch validation, and loaders that return plain frozen ``nn.Module`` subnets with weights from local files.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from nni.mutable import frozen_context
from nni.nas.hub.pytorch.autoformer import AutoFormer
from torch import nn

from ..errors import RetiaError
from ..weights import load_meta, load_weights

CONFIG_DIR = Path(__file__).with_name("autoformer_configs")

# Paper presets (search space of the supernet), plus `micro`: 32x32 inputs, 8x8 patches (17 tokens), <0.5M params,
# so a supernet trains on a laptop CPU in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(search_embed_dim=(192, 216, 240), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(3, 4),
                 search_depth=(12, 13, 14)),
    "small": dict(search_embed_dim=(320, 384, 448), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(5, 6, 7),
                  search_depth=(12, 13, 14)),
    "base": dict(search_embed_dim=(528, 576, 624), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(8, 9, 10),
                 search_depth=(14, 15, 16)),
    "micro": dict(search_embed_dim=(48, 64, 96), search_mlp_ratio=(2.0, 3.0, 4.0), search_num_heads=(1, 2),
                  search_depth=(2, 3, 4), img_size=32, patch_size=8, num_labels=10, drop_path_rate=0.05),
}
SEARCHED = {"autoformer-tiny": ("tiny", "AutoFormer-T.yaml"), "autoformer-small": ("small", "AutoFormer-S.yaml"),
            "autoformer-base": ("base", "AutoFormer-B.yaml")}
SUPERNET_KIND, SUBNET_KIND = "autoformer-supernet", "autoformer-subnet"


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


class AutoformerSpace(AutoFormer):
    """NNI's AutoFormer space with retia's presets and loaders (see the module docstring)."""

    # construction ---------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        """Constructor kwargs of a preset: ``tiny``, ``small``, ``base`` (ImageNet, 224²) or ``micro`` (32², CPU)."""
        key = str(name).lower()
        if key not in PRESETS:
            raise RetiaError(f"AutoFormer preset {name!r}: expected one of {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[key])

    @classmethod
    def config(cls, preset: str = "micro", **overrides: Any) -> dict[str, Any]:
        """The full, JSON-able constructor config of ``preset`` with ``overrides`` (e.g. ``num_labels=100``)."""
        cfg = cls.preset(preset)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return _jsonable(cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoformerSpace":
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        except TypeError as exc:
            raise RetiaError(f"AutoFormer config {config}: {exc}") from None

    @classmethod
    def from_preset(cls, preset: str = "micro", **overrides: Any) -> "AutoformerSpace":
        return cls.from_config(cls.config(preset, **overrides))

    # arch dicts -----------------------------------------------------------------------------------------------
    def complete_arch(self, arch: dict[str, Any]) -> dict[str, Any]:
        """Validate ``arch`` against this space and fill the labels of unused layers (``i >= depth``).

        Raises a one-line :class:`RetiaError` naming the first unknown label or out-of-range value.
        """
        if not isinstance(arch, dict):
            raise RetiaError(f"arch {arch!r}: expected a dict of labels (embed_dim, depth, mlp_ratio_i, num_head_i)")
        space = self.simplify()
        unknown = sorted(set(arch) - set(space))
        if unknown:
            raise RetiaError(f"arch label {unknown[0]!r} is not in this AutoFormer space (labels: embed_dim, depth, "
                             f"mlp_ratio_0..{len([k for k in space if k.startswith('mlp_ratio_')]) - 1}, num_head_i)")
        out: dict[str, Any] = {}
        depth = arch.get("depth")
        for label, mutable in space.items():
            values = list(mutable.values)
            if label in arch:
                value = arch[label]
                if value not in values:
                    raise RetiaError(f"arch {label}={value!r}: expected one of {values}")
                out[label] = value
            elif depth is not None and label.rpartition("_")[2].isdigit() and int(label.rpartition("_")[2]) >= depth:
                out[label] = values[0]  # layer beyond depth: unused, any value freezes to the same model
            else:
                raise RetiaError(f"arch is missing label {label!r} (expected one of {values})")
        return out

    @classmethod
    def searched_arch(cls, name: str) -> tuple[str, dict[str, Any]]:
        """``(preset, arch)`` of a paper's searched subnet: ``autoformer-tiny|small|base``."""
        if name not in SEARCHED:
            raise RetiaError(f"searched model {name!r}: expected one of {', '.join(SEARCHED)}")
        preset, filename = SEARCHED[name]
        retrain = yaml.safe_load((CONFIG_DIR / filename).read_text())["RETRAIN"]
        arch: dict[str, Any] = {"embed_dim": retrain["EMBED_DIM"], "depth": retrain["DEPTH"]}
        for i, (ratio, heads) in enumerate(zip(retrain["MLP_RATIO"], retrain["NUM_HEADS"])):
            arch[f"mlp_ratio_{i}"] = float(ratio)
            arch[f"num_head_{i}"] = int(heads)
        return preset, arch

    @staticmethod
    def count_params(arch: dict[str, Any], config: dict[str, Any]) -> int:
        """Parameters of the subnet ``arch`` in closed form (equals ``sum(p.numel())`` of the built subnet).

        Per layer with embed dim e, h heads of 64 dims, hidden width int(e*r): q/k/v and proj
        ``4*64h*e + 3*64h + e``, two relative-position modules ``2*2*(2L+2)*64`` (L = patches per side), two
        layer norms ``4e``, the MLP ``2*e*int(e*r) + int(e*r) + e``; plus patch embedding, cls token, position
        embedding, final norm and head.
        """
        e, depth = arch["embed_dim"], arch["depth"]
        img, patch = config.get("img_size", 224), config.get("patch_size", 16)
        classes, channels = config.get("num_labels", 1000), config.get("in_channels", 3)
        side = img // patch
        rpe = config.get("rpe", True)
        total = channels * patch * patch * e + e + e + (side * side + 1) * e + 2 * e
        total += e * classes + classes if classes > 0 else 0
        for i in range(depth):
            qk = 64 * arch[f"num_head_{i}"]
            hidden = int(e * arch[f"mlp_ratio_{i}"])
            total += 4 * qk * e + 3 * qk * config.get("qkv_bias", True) + e
            total += 2 * 2 * (2 * side + 2) * 64 if rpe else 0
            total += 4 * e + 2 * e * hidden + hidden + e
        return total

    @staticmethod
    def count_flops(arch: dict[str, Any], config: dict[str, Any]) -> int:
        """Multiply-adds of one image through the subnet ``arch`` in closed form (equals torch's
        ``FlopCounterMode`` / 2: matmuls, linears and the patch convolution; norms and softmax are not counted).

        Per layer with N tokens: q/k/v/proj ``4*N*e*64h``, QK^T, AV and the two relative-position products
        ``4*h*N^2*64``, the MLP ``2*N*e*int(e*r)``.
        """
        e, depth = arch["embed_dim"], arch["depth"]
        img, patch = config.get("img_size", 224), config.get("patch_size", 16)
        classes, channels = config.get("num_labels", 1000), config.get("in_channels", 3)
        side = img // patch
        tokens = side * side + 1
        attn_products = 4 if config.get("rpe", True) else 2
        total = side * side * e * channels * patch * patch + (e * classes if classes > 0 else 0)
        for i in range(depth):
            heads = arch[f"num_head_{i}"]
            hidden = int(e * arch[f"mlp_ratio_{i}"])
            total += 4 * tokens * e * 64 * heads + attn_products * heads * tokens * tokens * 64
            total += 2 * tokens * e * hidden
        return total

    # models ---------------------------------------------------------------------------------------------------
    @classmethod
    def build_subnet(cls, arch: dict[str, Any], config: dict[str, Any]) -> nn.Module:
        """A freshly initialised plain module for ``arch`` in the space of ``config``."""
        with frozen_context.bypass():
            space = cls.from_config(config)
        full = space.complete_arch(arch)
        return cls.frozen_factory(full)(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    @classmethod
    def build_supernet(cls, config: dict[str, Any]) -> "AutoformerSpace":
        """The weight-entangled one-shot supernet of ``config`` (NNI ``RandomOneShot`` mixed operations)."""
        from nni.nas.strategy import RandomOneShot

        space = cls.from_config(config)
        RandomOneShot().mutate_model(space)
        return space

    @classmethod
    def load_searched_model(cls, name: str, weights: str | None = None, num_labels: int = 1000) -> nn.Module:
        """The paper's searched subnet ``autoformer-tiny|small|base`` as a plain module (weights: a local file)."""
        preset, arch = cls.searched_arch(name)
        config = cls.config(preset, num_labels=num_labels)
        if weights is None:
            return cls.build_subnet(arch, config)
        return cls.load_subnet(arch, weights=weights, config=config)

    @classmethod
    def load_supernet(cls, weights: str, config: dict[str, Any] | None = None) -> "AutoformerSpace":
        """A trained supernet from a retia supernet weights file (its JSON sidecar holds the config)."""
        meta = load_meta(weights) or {}
        if meta.get("kind", SUPERNET_KIND) != SUPERNET_KIND:
            raise RetiaError(f"weights {weights!r} hold a {meta.get('kind')}, expected an AutoFormer supernet")
        config = config or meta.get("config")
        if config is None:
            raise RetiaError(f"weights {weights!r} have no JSON sidecar with the space config: pass config=/--preset")
        supernet = cls.build_supernet(config)
        _load_strict(supernet, load_weights(weights), weights)
        return supernet

    @classmethod
    def load_subnet(cls, arch: dict[str, Any], weights: str, config: dict[str, Any] | None = None) -> nn.Module:
        """The subnet of ``arch`` as a plain module, weights from a subnet file or sliced from a supernet file."""
        meta = load_meta(weights) or {}
        config = config or meta.get("config")
        if config is None:
            raise RetiaError(f"weights {weights!r} have no JSON sidecar with the space config: pass config=")
        state = load_weights(weights)
        if meta.get("kind") == SUPERNET_KIND or (not meta and any(k.startswith("blocks.blocks.") for k in state)):
            supernet = cls.build_supernet(config)
            _load_strict(supernet, state, weights)
            return supernet.freeze(supernet.complete_arch(arch))
        model = cls.build_subnet(arch, config)
        _load_strict(model, state, weights)
        return model


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RetiaError(f"weights {str(source)!r} do not fit this model: {detail}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise RetiaError(f"weights {str(source)!r}: {key} has shape {tuple(value.shape)}, "
                             f"this model expects {tuple(own[key].shape)}")
    module.load_state_dict(state)
