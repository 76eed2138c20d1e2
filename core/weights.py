"""Weights on disk: safetensors plus a JSON sidecar for the config / arch. Nothing is unpickled."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import RetiaError

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def sidecar(path: str | Path) -> Path:
    """The JSON file stored next to a weights file (``w.safetensors`` → ``w.json``)."""
    return Path(path).with_suffix(".json")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` as safetensors at ``path`` and ``meta`` (config, arch, ...) as JSON beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetiaError(f"weights path {str(path)!r}: expected a .safetensors file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    if meta is not None:
        sidecar(path).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


def load_weights(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from a torch file loaded with ``weights_only=True``.

    For torch files holding a dict of dicts (``{'model': ...}``, ``{'state_dict': ...}``) pass ``key`` or let it
    pick the first of ``model``, ``state_dict``, ``module``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RetiaError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise RetiaError(f"weights file {str(path)!r} is not a valid safetensors file ({exc})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise RetiaError(f"weights file {str(path)!r}: expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RetiaError(f"weights file {str(path)!r} cannot be loaded safely (weights_only=True): "
                         f"{str(exc).splitlines()[0]}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ([key] if key else ["model", "state_dict", "module"]):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
        else:
            raise RetiaError(f"weights file {str(path)!r} holds no state dict (keys: {sorted(obj)[:8]})")
    if not isinstance(obj, dict):
        raise RetiaError(f"weights file {str(path)!r} holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def load_meta(path: str | Path) -> dict[str, Any] | None:
    """The JSON sidecar of a weights file, or None when it has none."""
    p = sidecar(path)
    return json.loads(p.read_text()) if p.exists() else None
