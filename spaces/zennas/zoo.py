"""The published ZenNets (Lin et al., ICCV 2021) by name, timm-style: ``list_models()``, ``create_model(name)``.

The 12 published structures are package data (``structures/*.txt``). The CIFAR ones exist with a CIFAR-10
and a CIFAR-100 head; the ImageNet FLOPs-budget ones were published with SE gates (``..._SE_res224``; the
names without ``_SE`` are accepted as aliases). Pretrained weights are not downloaded: pass the path of the
official ``.pth`` file (``MODELS[name]['pretrained_url']`` says where it is published), it is read with
``torch.load(weights_only=True)`` and its key names are mapped onto ours.
"""
from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

from retia.errors import RetiaError

from .model import ZenNet, load_official_weights

__all__ = ["MODELS", "create_model", "list_models", "model_info", "resolve_arch", "structure_of"]

STRUCTURE_DIR = Path(__file__).resolve().parent / "structures"
_URL = "https://idstcv.oss-cn-zhangjiakou.aliyuncs.com/ZenNet/pretrained_models/{}"


def _entry(txt: str, num_classes: int, use_se: bool, resolution: int, crop: int, pth: str) -> dict[str, Any]:
    return {"structure_file": txt, "num_classes": num_classes, "use_se": use_se, "resolution": resolution,
            "crop_image_size": crop, "pretrained_url": _URL.format(pth)}


MODELS: dict[str, dict[str, Any]] = {}
for _size in ("05M", "1M", "2M"):
    for _ds, _n in (("cifar10", 10), ("cifar100", 100)):
        MODELS[f"zennet_{_ds}_model_size{_size}_res32"] = _entry(
            f"zennet_cifar_model_size{_size}_res32.txt", _n, False, 32, 32,
            f"zennet_{_ds}_model_size{_size}_res32/best-params_rank0.pth")
for _f in ("400M", "600M", "900M"):
    _dir = ("" if _f == "900M" else "iccv2021_") + f"zennet_imagenet1k_flops{_f}_SE_res224"
    MODELS[f"zennet_imagenet1k_flops{_f}_SE_res224"] = _entry(
        f"zennet_imagenet1k_flops{_f}_res224.txt", 1000, True, 224, 320, f"{_dir}/student_best-params_rank0.pth")
for _lat in ("01", "02", "03", "05", "08", "12"):
    MODELS[f"zennet_imagenet1k_latency{_lat}ms_res224"] = _entry(
        f"zennet_imagenet1k_latency{_lat}ms_res224.txt", 1000, False, 224, 380 if _lat == "12" else 320,
        f"iccv2021_zennet_imagenet1k_latency{_lat}ms_res224/student_best-params_rank0.pth")

#: other accepted names -> the published name
ALIASES = {f"zennet_imagenet1k_flops{f}_res224": f"zennet_imagenet1k_flops{f}_SE_res224"
           for f in ("400M", "600M", "900M")}


def list_models(pattern: str | None = None, *, include_aliases: bool = False) -> list[str]:
    """Names of the published ZenNets (sorted), optionally filtered with a shell pattern (``'*cifar10_*'``)."""
    names = list(MODELS) + (list(ALIASES) if include_aliases else [])
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return sorted(names)


def _canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODELS:
        close = [n for n in MODELS if name.split("_res")[0].replace("_SE", "") in n]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RetiaError(f"unknown ZenNet {name!r}{hint} (known: retia.spaces.zennas.list_models())")
    return name


@lru_cache(maxsize=None)
def _read_structure(filename: str) -> str:
    return (STRUCTURE_DIR / filename).read_text().split()[0].strip()


def structure_of(name: str) -> str:
    """The structure string of a published ZenNet."""
    return _read_structure(MODELS[_canonical(name)]["structure_file"])


def model_info(name: str) -> dict[str, Any]:
    """Everything known about a published ZenNet: structure, num_classes, use_se, resolution, crop, url."""
    name = _canonical(name)
    return {"name": name, "structure": structure_of(name), **MODELS[name]}


def create_model(name: str, num_classes: int | None = None, weights: str | Path | None = None, *,
                 dropout: float | None = None, **build_kwargs) -> ZenNet:
    """A published ZenNet by name, optionally with the official pretrained weights from a local file.

    ``num_classes`` defaults to the model's (10, 100 or 1000); with ``weights`` and a different
    ``num_classes`` the classifier keeps its fresh initialisation (timm-style). ``build_kwargs`` go to
    :class:`~retia.spaces.zennas.ZenNet` (``no_BN``, ``no_reslink``, ``use_se`` overrides the published flag).
    """
    info = model_info(name)
    n = info["num_classes"] if num_classes is None else num_classes
    use_se = build_kwargs.pop("use_se", info["use_se"])
    model = ZenNet(info["structure"], n, use_se=use_se, dropout=dropout, **build_kwargs)
    model.zoo_name = info["name"]
    model.default_resolution = info["resolution"]
    if weights is not None:
        load_official_weights(model, weights, skip_head=n != info["num_classes"])
    return model


def resolve_arch(arch: str) -> dict[str, Any]:
    """A ZenNet name, a structure string or a file holding one → ``{"structure", "name", "num_classes",
    "use_se", "resolution"}`` (``None`` where a plain string does not say)."""
    if not isinstance(arch, str) or not arch.strip():
        raise RetiaError(f"--arch must be a ZenNet name, a structure string or a file, got {arch!r}")
    arch = arch.strip()
    if arch in MODELS or arch in ALIASES:
        info = model_info(arch)
        return {"structure": info["structure"], "name": info["name"], "num_classes": info["num_classes"],
                "use_se": info["use_se"], "resolution": info["resolution"]}
    if "(" in arch:
        return {"structure": arch, "name": None, "num_classes": None, "use_se": None, "resolution": None}
    path = Path(arch).expanduser()
    if path.is_file():
        text = path.read_text().strip()
        if not text:
            raise RetiaError(f"structure file {arch!r} is empty")
        return {"structure": text.splitlines()[0].strip(), "name": None, "num_classes": None, "use_se": None,
                "resolution": None}
    if arch.startswith("zennet"):
        _canonical(arch)  # raises with a hint
    raise RetiaError(f"--arch {arch!r} is neither a ZenNet name (see list_models()), a structure string nor a file")
