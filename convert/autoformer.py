"""Convert an official microsoft/Cream AutoFormer checkpoint into retia AutoFormer weights (supernet or subnet).

Usage::

    python convert/autoformer.py --name tiny --src supernet-tiny.pth --dst tiny-supernet.safetensors
    python convert/autoformer.py --name tiny --src supernet-tiny.pth --dst t.safetensors --subnet autoformer-tiny
    python convert/autoformer.py --name small --src supernet-small.pth --dst s.safetensors --subnet arch.json

The source is what Cream's ``supernet_train.py`` saves: ``{'model': state_dict, 'optimizer': ..., 'args':
argparse.Namespace, ...}`` (a bare state dict is accepted too). It is read with ``torch.load(weights_only=True)``
with ``argparse.Namespace`` as the only extra class allowed; any other class in the file is refused (and never
constructed) with a one-line :class:`~retia.errors.RetiaError` that names it.

How the official model computes a sampled subnet (``--change_qkv --relative_position``, the released runs), and
where each piece lands in NNI's space (``retia.spaces.autoformer.AutoformerSpace``). ``E`` is the official super
embed dim (tiny 256, small 448, base 640), ``e`` the sampled embed dim, ``h`` a layer's heads, ``H`` the largest
head count of the retia space, head dim 64 throughout:

* **q/k/v** -- one ``qkv`` linear of ``3E x E``. For ``h`` heads the official code keeps the first ``e`` input
  columns and the first ``3*64h`` rows, then regroups those rows with stride 3: rows ``0, 3, 6, ...`` are q,
  ``1, 4, 7, ...`` are k, ``2, 5, 8, ...`` are v. So q/k/v weights are the rows ``0::3`` / ``1::3`` / ``2::3`` of
  the full matrix, and a smaller ``h`` keeps a prefix of each: the same prefix slicing NNI's mixed linear does.
  The qkv **bias** is *not* regrouped: the official code takes the contiguous ``bias[:3*64h]`` and splits it in
  three, so q = ``bias[0:64h]``, k = ``bias[64h:128h]``, v = ``bias[128h:192h]``.
* **attention scale** -- with ``change_qkv`` the official sampled scale is ``(64h // h) ** -0.5 = 64 ** -0.5``,
  the value NNI's attention uses with ``qk_scale=None`` (``head_dim ** -0.5``), so no ``qk_scale`` is passed. (It
  would be ``(e // h) ** -0.5`` without ``change_qkv``; such a model has head dim ``e/h``, which NNI's space cannot
  express: refused.) Both codes also multiply the relative-position term of the logits by the same scale.
* **relative position** -- per layer two tables (for k and for v) of two parts (``_v`` vertical, ``_h``
  horizontal), each ``(2M+2) x E//H_official`` with ``M = args.max_relative_position`` (default 14); the sampled
  model uses their first 64 columns. Row 0 serves the cls token, row ``clamp(d, -M, M) + M + 1`` a patch distance
  ``d``. NNI's tables have ``2L+2`` rows with ``L`` = patches per side, and distances never exceed ``L - 1`` there,
  so each NNI row ``L + 1 + d`` receives the official row ``clamp(d, -M, M) + M + 1``: exact for any ``M``.
* **everything else** is prefix slicing in both codes: patch embedding conv (``patch_embed_super.proj``, first
  ``e`` filters), cls token and absolute position embedding (first ``e`` channels), the pre-norm layer norms
  ``attn_layer_norm`` / ``ffn_layer_norm`` and the final ``norm`` (first ``e``, eps 1e-5), ``proj``
  (``[:e, :64h]``), ``fc1`` (``[:int(e*r), :e]``), ``fc2`` (``[:e, :int(e*r)]``), ``head`` (``[:, :e]``), exact
  GELU. Layers at and beyond the sampled depth are skipped. The official supernet is wider than NNI's space
  (e.g. tiny: E = 256 but the space's largest embed dim is 240) and is sliced to it.
* **pooling** -- ``args.gp`` (``--gp``, used for all released models): mean over the patch tokens, otherwise the
  cls token; becomes the config's ``global_pooling``. A file without ``args`` is taken to use ``--gp``
  (override with ``pooling='cls'`` / ``--pooling cls``).

Exactness. A **subnet** file (``subnet=``) holds, layer by layer, the official tensors for that arch, the bias
split at that layer's ``h`` included: its output equals the official model's for the same subnet up to float32
rounding (``tests/test_convert_autoformer.py`` checks ``atol=1e-5`` against an independent implementation of the
official forward). A **supernet** file has one q/k/v bias per layer of ``64H`` that NNI slices to its prefix
``[:64h]``; it is cut from the official bias at ``h = H`` (q ``[0:64H]``, k ``[64H:128H]``, v ``[128H:192H]``).
For a layer sampled with ``h = H`` heads this is exactly the official bias; for ``h < H`` the official k and v
biases start at ``64h`` and ``128h``, which a prefix of a fixed vector cannot follow. The q bias is always right
(it starts at 0). The k bias does not matter either: it adds ``q . b_k`` to every logit of a query row, which
softmax cancels. The v bias does: it is added to every head's attention output, so a subnet sliced from the
converted supernet differs from the official subnet in each layer with fewer than ``H`` heads by ``proj`` applied
to the v-bias difference. Subnets whose every layer has ``H`` heads are exact; for the others convert with
``subnet=`` (it is cheap), or fine-tune the supernet briefly.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retia.errors import RetiaError
from retia.spaces.autoformer import SEARCHED, SUBNET_KIND, SUPERNET_KIND, AutoformerSpace
from retia.weights import save_weights

HEAD_DIM = 64
SOURCE_FORMAT = "microsoft/Cream AutoFormer"
ALLOWED_GLOBALS = (argparse.Namespace,)
# Keys every official checkpoint has (with at least one block).
REQUIRED_KEYS = ("patch_embed_super.proj.weight", "patch_embed_super.proj.bias", "cls_token",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.fc1.weight",
                 "blocks.0.fc2.weight", "blocks.0.attn_layer_norm.weight", "blocks.0.ffn_layer_norm.weight")
# Config keys the checkpoint decides (a given config may state them only when it agrees).
STRUCTURAL = ("img_size", "patch_size", "in_channels", "num_labels", "qkv_bias", "pre_norm", "global_pooling",
              "absolute_position", "rpe")


# reading the official file --------------------------------------------------------------------------------------
@dataclass
class OfficialCheckpoint:
    """The model state of an official checkpoint, its training ``args`` (a dict, or None) and its shapes."""

    state: dict[str, torch.Tensor]
    args: dict[str, Any] | None
    path: str = ""
    dims: dict[str, Any] = field(default_factory=dict)


def _refused_globals(path: Path) -> list[str]:
    """Globals the file would import beyond torch's weights-only set and ``argparse.Namespace`` (zip format)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) torch files cannot be scanned: torch.load refuses them below instead
        return []
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in ALLOWED_GLOBALS}
    return sorted(n for n in names if n not in allowed)


def load_official(path: str | Path) -> OfficialCheckpoint:
    """Read an official AutoFormer checkpoint safely (tensors, plain containers and ``argparse.Namespace`` only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RetiaError(f"official checkpoint {str(path)!r} does not exist")
    refused = _refused_globals(path)
    if refused:
        raise RetiaError(f"official checkpoint {str(path)!r} holds {', '.join(refused)}: only tensors and "
                         f"argparse.Namespace are loaded (refused, nothing was unpickled)")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            raise RetiaError(f"official checkpoint {str(path)!r} holds {found.group(1)}: only tensors and "
                             f"argparse.Namespace are loaded (refused)") from None
        raise RetiaError(f"official checkpoint {str(path)!r} cannot be read as a torch file: "
                         f"{_reason(exc)}") from None
    return parse_official(obj, source=str(path))


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load failure (not its advice to retry with weights_only=False)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    line = next((part.strip() for part in after.splitlines() if part.strip()), "")
    line = f"{type(exc).__name__}: {line}" if len(line) < 24 else line
    return line if len(line) <= 160 else line[:157] + "..."


def parse_official(obj: Any, source: str = "<memory>") -> OfficialCheckpoint:
    """Take the state dict (``obj['model']`` or ``obj`` itself) and ``args`` of an official checkpoint object."""
    args = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        raw_args = obj.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = vars(raw_args)
        elif isinstance(raw_args, dict):
            args = dict(raw_args)
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise RetiaError(f"official checkpoint {source!r} holds no state dict (expected {{'model': state_dict, ...}})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:4])
        raise RetiaError(f"{source!r} is not an official AutoFormer checkpoint: no key {missing[0]!r} "
                         f"(it has {sample}, ...)")
    ckpt = OfficialCheckpoint(state={k: v.float() for k, v in state.items()}, args=args, path=source)
    ckpt.dims = _official_dims(ckpt)
    return ckpt


def _official_dims(ckpt: OfficialCheckpoint) -> dict[str, Any]:
    s, args = ckpt.state, ckpt.args or {}
    conv = s["patch_embed_super.proj.weight"]
    embed, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    if conv.shape[2] != conv.shape[3]:
        raise RetiaError(f"{ckpt.path!r}: non-square patches {tuple(conv.shape[2:])} are not supported")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in s:
        depth += 1
    qkv = s["blocks.0.attn.qkv.weight"]
    if qkv.shape != (3 * embed, embed):
        raise RetiaError(f"{ckpt.path!r}: blocks.0.attn.qkv.weight has shape {tuple(qkv.shape)}, expected "
                         f"{(3 * embed, embed)} for super embed dim {embed}")
    if "pos_embed" in s:
        patches = s["pos_embed"].shape[1] - 1
    elif "input_size" in args:
        patches = (int(args["input_size"]) // patch) ** 2
    else:
        raise RetiaError(f"{ckpt.path!r} has neither pos_embed nor args.input_size: cannot tell the image size")
    side = round(patches ** 0.5)
    if side * side != patches:
        raise RetiaError(f"{ckpt.path!r}: {patches} patches do not form a square grid")
    rpe = "blocks.0.attn.rel_pos_embed_k.embeddings_table_v" in s
    rows = s["blocks.0.attn.rel_pos_embed_k.embeddings_table_v"].shape[0] if rpe else 0
    return {
        "embed_dim": embed, "depth": depth, "in_channels": channels, "patch_size": patch, "side": side,
        "img_size": side * patch, "num_labels": s["head.weight"].shape[0] if "head.weight" in s else 0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in s, "pre_norm": "norm.weight" in s,
        "absolute_position": "pos_embed" in s, "rpe": rpe, "max_relative_position": (rows - 2) // 2 if rpe else None,
        "gp": args.get("gp"), "change_qkv": args.get("change_qkv"),
    }


# config and arch ---------------------------------------------------------------------------------------------
def official_config(ckpt: OfficialCheckpoint, name: str | None = None, config: dict[str, Any] | None = None,
                    pooling: str = "auto") -> dict[str, Any]:
    """The retia space config for ``ckpt``: the preset ``name`` (or ``config``) plus the checkpoint's structure.

    Image/patch size, channels, classes, qkv bias, pre-norm, absolute / relative position come from the checkpoint;
    ``global_pooling`` from ``args.gp`` (``pooling='auto'``; no args: mean pooling as in the released runs) or
    ``pooling='mean'|'cls'``. A stated config value that contradicts the checkpoint is an error.
    """
    if (name is None) == (config is None):
        raise RetiaError("give exactly one of a preset name (--name tiny|small|base) and a space config (--config)")
    if pooling not in ("auto", "mean", "cls"):
        raise RetiaError(f"pooling {pooling!r}: expected auto, mean or cls")
    dims = ckpt.dims
    if dims["change_qkv"] is False:
        raise RetiaError(f"{ckpt.path!r} was trained without --change_qkv (head dim = embed dim / heads); NNI's "
                         f"AutoFormer space has head dim 64 and cannot hold it")
    if name is None and not isinstance(config, dict):
        raise RetiaError(f"space config {config!r}: expected a dict of AutoformerSpace constructor arguments")
    base = AutoformerSpace.config(name) if name is not None else dict(config)  # type: ignore[arg-type]
    gp = {"mean": True, "cls": False}.get(pooling, True if dims["gp"] is None else bool(dims["gp"]))
    derived = {"img_size": dims["img_size"], "patch_size": dims["patch_size"], "in_channels": dims["in_channels"],
               "num_labels": dims["num_labels"], "qkv_bias": dims["qkv_bias"], "pre_norm": dims["pre_norm"],
               "global_pooling": gp, "absolute_position": dims["absolute_position"], "rpe": dims["rpe"]}
    label = f"preset {name}" if name is not None else "config"
    for key in STRUCTURAL:
        if key in base and base[key] != derived[key]:
            raise RetiaError(f"{label} has {key}={base[key]!r} but the official checkpoint has {derived[key]!r}")
    if base.get("qk_scale") not in (None, HEAD_DIM ** -0.5):
        raise RetiaError(f"{label} has qk_scale={base['qk_scale']!r}; the official model scales by 64 ** -0.5")
    out = {**base, **derived}
    _check_fits(ckpt, out, label)
    return out


def _check_fits(ckpt: OfficialCheckpoint, config: dict[str, Any], label: str) -> None:
    dims = ckpt.dims
    defaults = AutoformerSpace.preset("tiny")  # NNI's AutoFormer constructor defaults are the tiny space
    space = {k: list(config.get(k, defaults[k])) for k in
             ("search_embed_dim", "search_num_heads", "search_mlp_ratio", "search_depth")}
    embed, heads = max(space["search_embed_dim"]), max(space["search_num_heads"])
    hidden = max(int(e * r) for e in space["search_embed_dim"] for r in space["search_mlp_ratio"])
    problems = [
        (embed > dims["embed_dim"], f"embed dim up to {embed}, the official supernet has {dims['embed_dim']}"),
        (HEAD_DIM * heads > dims["embed_dim"],
         f"{heads} heads of 64 ({HEAD_DIM * heads} q/k/v rows), the official supernet has {dims['embed_dim']}"),
        (max(space["search_depth"]) > dims["depth"],
         f"depth up to {max(space['search_depth'])}, the official supernet has {dims['depth']} layers"),
        (hidden > ckpt.state["blocks.0.fc1.weight"].shape[0],
         f"MLP width up to {hidden}, the official supernet has {ckpt.state['blocks.0.fc1.weight'].shape[0]}"),
    ]
    for bad, what in problems:
        if bad:
            raise RetiaError(f"{label} needs {what}: the checkpoint does not fit this space")


def resolve_subnet(subnet: str | dict[str, Any], name: str | None,
                   custom: bool = False) -> tuple[str | None, dict[str, Any]]:
    """``(preset, arch)`` of ``--subnet``: a searched model name, a JSON arch file, or an arch dict.

    A searched model name sets the preset when none is given (``custom``: a config is given instead).
    """
    if isinstance(subnet, dict):
        return name, subnet
    if subnet in SEARCHED:
        preset, arch = AutoformerSpace.searched_arch(subnet)
        if custom:
            return name, arch
        if name is not None and name != preset:
            raise RetiaError(f"--subnet {subnet} is a {preset} model, not in the {name} space (use --name {preset})")
        return preset, arch
    path = Path(subnet).expanduser()
    if not path.is_file():
        raise RetiaError(f"--subnet {subnet!r}: expected {', '.join(SEARCHED)} or an existing JSON arch file")
    try:
        arch = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetiaError(f"--subnet {subnet!r} is not valid JSON ({exc})") from None
    if isinstance(arch, dict) and isinstance(arch.get("arch"), dict):  # a retia best.json / sidecar
        arch = arch["arch"]
    if not isinstance(arch, dict):
        raise RetiaError(f"--subnet {subnet!r}: expected a JSON object of labels (embed_dim, depth, ...)")
    return name, arch


# tensors ------------------------------------------------------------------------------------------------------
def _prefix(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tensor.dim() != len(shape) or any(have < need for have, need in zip(tensor.shape, shape)):
        raise RetiaError(f"official {what} has shape {tuple(tensor.shape)}, too small for {tuple(shape)}")
    return tensor[tuple(slice(0, n) for n in shape)].clone()


def _relative_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """Rows of an official relative-position table (``2M+2`` rows) reindexed for NNI's ``2*side+2`` rows."""
    reach = (table.shape[0] - 2) // 2
    distance = torch.arange(-side, side + 1)
    rows = torch.cat([torch.zeros(1, dtype=torch.long), distance.clamp(-reach, reach) + reach + 1])
    return table[rows]


_BLOCK = re.compile(r"^blocks\.(?:blocks\.)?(\d+)\.(.+)$")
_TOP = {"patch_embed.weight": "patch_embed_super.proj.weight", "patch_embed.bias": "patch_embed_super.proj.bias",
        "cls_token.cls_token": "cls_token", "pos_embed.pos_embed": "pos_embed", "norm.weight": "norm.weight",
        "norm.bias": "norm.bias", "head.weight": "head.weight", "head.bias": "head.bias"}


def _official_tensor(ckpt: OfficialCheckpoint, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The official tensor for the retia state-dict entry ``key`` of ``shape`` (supernet or subnet key)."""
    s = ckpt.state
    if key in _TOP:
        src = _TOP[key]
        if src not in s:
            raise RetiaError(f"official checkpoint has no {src!r}, needed for {key}")
        return _prefix(s[src], shape, src)
    match = _BLOCK.match(key)
    if not match:
        raise RetiaError(f"no official counterpart for retia weight {key!r}")
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"blocks.{layer}."
    qkv = {"q": 0, "k": 1, "v": 2}
    if rest.startswith("attn.") and rest[5:7] in ("q.", "k.", "v.") and rest.count(".") == 2:
        part, kind = qkv[rest[5]], rest.rsplit(".", 1)[1]
        src = f"{prefix}attn.qkv.{kind}"
        if src not in s:
            raise RetiaError(f"official checkpoint has no {src!r}, needed for {key}")
        if kind == "weight":  # rows regrouped with stride 3, then the prefix of each group
            return _prefix(s[src][part::3], shape, f"{src}[{part}::3]")
        width = shape[0]  # 64h: the bias is sliced contiguously at this layer's head count
        return _prefix(s[src], (3 * width,), src)[part * width:(part + 1) * width].clone()
    if rest.startswith("attn.rel_pos_embed_"):
        src = prefix + rest
        if src not in s:
            raise RetiaError(f"official checkpoint has no {src!r}, needed for {key}")
        side = ckpt.dims["side"]
        return _prefix(_relative_table(s[src], side), shape, src)
    src = prefix + rest
    if src not in s:
        raise RetiaError(f"official checkpoint has no {src!r}, needed for {key}")
    return _prefix(s[src], shape, src)


def convert_state_dict(ckpt: OfficialCheckpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Official tensors laid out as ``model``'s state dict (a retia supernet or a frozen subnet)."""
    state = {key: _official_tensor(ckpt, key, tuple(value.shape)) for key, value in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return state


# the whole conversion ----------------------------------------------------------------------------------------
@dataclass
class Conversion:
    """What :func:`convert` wrote: the safetensors path, its sidecar meta and the converted state dict."""

    path: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]


def convert(src: str | Path, dst: str | Path, name: str | None = None, subnet: str | dict[str, Any] | None = None,
            config: dict[str, Any] | None = None, pooling: str = "auto") -> Conversion:
    """Convert the official checkpoint ``src`` into retia weights at ``dst`` (``.safetensors`` + ``.json``).

    ``name``: preset ``tiny|small|base`` (or ``config``: an AutoformerSpace config dict for custom spaces).
    ``subnet``: None for the supernet; ``autoformer-tiny|small|base`` (the paper's searched arch), a JSON arch
    file, or an arch dict for a subnet. See the module docstring for what is exact.
    """
    if name is not None and config is not None:
        raise RetiaError("give a preset name (--name) or a space config (--config), not both")
    if name is not None:
        AutoformerSpace.preset(name)  # one-line error for an unknown preset, before reading the file
    if subnet is not None:
        name, arch = resolve_subnet(subnet, name, custom=config is not None)
    if name is None and config is None:
        raise RetiaError("give a preset name (--name tiny|small|base) or a space config (--config)")
    if not str(dst).endswith(".safetensors"):
        raise RetiaError(f"--dst {str(dst)!r}: expected a .safetensors file name")
    ckpt = load_official(src)
    space_config = official_config(ckpt, name=name, config=None if name is not None else config, pooling=pooling)
    source = {"format": SOURCE_FORMAT, "file": Path(src).name, "super_embed_dim": ckpt.dims["embed_dim"],
              "super_depth": ckpt.dims["depth"], "max_relative_position": ckpt.dims["max_relative_position"]}
    if subnet is None:
        model = AutoformerSpace.build_supernet(space_config)
        heads = max(space_config["search_num_heads"])
        meta: dict[str, Any] = {"kind": SUPERNET_KIND, "config": space_config, "converted_from": source,
                                "exact_num_heads": heads}
    else:
        from nni.mutable import frozen_context

        with frozen_context.bypass():
            full_arch = AutoformerSpace.from_config(space_config).complete_arch(arch)
        model = AutoformerSpace.build_subnet(full_arch, space_config)
        meta = {"kind": SUBNET_KIND, "config": space_config, "arch": full_arch, "converted_from": source}
    state = convert_state_dict(ckpt, model)
    path = save_weights(state, dst, meta)
    return Conversion(path=path, meta=meta, state=state)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Exactness: a subnet file reproduces the official subnet; a supernet file "
                                       "is exact for subnets whose layers all have the most heads (docs/"
                                       "convert_autoformer.md).")
    p.add_argument("--name", default=None, help="space preset: tiny, small or base (or micro)")
    p.add_argument("--config", default=None, help="space config JSON (AutoformerSpace arguments) instead of --name")
    p.add_argument("--src", required=True, help="official checkpoint (.pth from microsoft/Cream AutoFormer)")
    p.add_argument("--dst", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--subnet", default=None,
                   help="autoformer-tiny|small|base or an arch JSON file: write that subnet instead of the supernet")
    p.add_argument("--pooling", default="auto", choices=("auto", "mean", "cls"),
                   help="auto: args.gp of the checkpoint (mean when it has no args); mean / cls to force")
    return p


def main(argv: list[str] | None = None) -> Conversion:
    args = build_parser().parse_args(argv)
    if args.config is not None and args.name is not None:
        raise RetiaError("--name and --config exclude each other")
    config = None
    if args.config is not None:
        path = Path(args.config).expanduser()
        if not path.is_file():
            raise RetiaError(f"--config {args.config!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RetiaError(f"--config {args.config!r} is not valid JSON ({exc})") from None
        if isinstance(config, dict) and isinstance(config.get("config"), dict):  # a retia weights sidecar
            config = config["config"]
    result = convert(args.src, args.dst, name=args.name, subnet=args.subnet, config=config, pooling=args.pooling)
    meta = result.meta
    print(f"wrote {result.path} (+ {result.path.with_suffix('.json').name}): {meta['kind']}, "
          f"{sum(t.numel() for t in result.state.values()) / 1e6:.2f}M parameters")
    if meta["kind"] == SUPERNET_KIND:
        print(f"exact for subnets whose layers all have {meta['exact_num_heads']} heads; fewer heads differ from the "
              f"official model in the v bias (convert with --subnet for an exact subnet)")
    return result


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
