"""AIO-P's shared-head shortcut: cheap labels from one task head shared by many subnets of a supernet.

Training every architecture of a family on a new task is the expensive part of a predictor's ground truth.
AIO-P trains one task head on the latent representations of many subnets of a pretrained supernet, then
fine-tunes it briefly per architecture; the resulting scores are cheap labels whose ranking approximates that of
individually trained networks. Here, on the AutoFormer ``micro`` space and the embedded digits:

1. :func:`train_supernet`: the weight-sharing supernet (NNI ``RandomOneShot`` mixed operations), one uniformly
   sampled subnet per step (:func:`activate` drives NNI's own ``resample`` with the arch as memo), trained with the
   family's recipe (:func:`retia.evaluators.aiop.family.train_model`);
2. :func:`subnet_features`: the frozen subnet's pooled latent (the class token after the final norm, the input of
   the supernet's own head), zero-padded to the largest embedding width;
3. :func:`train_shared_head`: a fresh MLP head trained on the features of ``head_archs`` subnets at once;
4. :func:`cheap_label`: a copy of the shared head fine-tuned for ``ft_epochs`` on one arch's features; its
   validation top-1 (%) is the arch's cheap label;
5. :func:`rank_agreement`: SRCC and Kendall tau of cheap labels against fully trained ones.

``python -m retia.evaluators.aiop.family --space autoformer --n 40 -o f.safetensors --shared-head`` runs it on a
family and writes ``f.shared_head.json`` (per-arch cheap labels and the agreement) and ``f.supernet.safetensors``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from retia.errors import RetiaError

from .family import TrainSettings, digits_split, get_space, load_family, sample_archs, train_model
from .predictor import kendall_tau, spearman

__all__ = ["activate", "train_supernet", "subnet_features", "SharedHead", "train_shared_head", "cheap_label",
           "rank_agreement", "label_family_shared_head"]


def rank_agreement(cheap: Sequence[float], full: Sequence[float]) -> dict[str, float]:
    """``{'srcc', 'kendall', 'n'}`` of ``cheap`` labels against ``full`` (fully trained) labels of the same archs."""
    a = np.asarray(cheap, dtype=np.float64).reshape(-1)
    b = np.asarray(full, dtype=np.float64).reshape(-1)
    if len(a) != len(b) or len(a) < 2:
        raise RetiaError(f"rank agreement: got {len(a)} cheap and {len(b)} full labels, expected two equal "
                         "lengths >= 2")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise RetiaError("rank agreement: labels contain NaN or inf")
    return {"srcc": spearman(a, b), "kendall": kendall_tau(a, b), "n": int(len(a))}


def _supernet_modules(supernet: nn.Module) -> list[nn.Module]:
    from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule

    return [m for m in supernet.modules() if isinstance(m, BaseSuperNetModule)]


def activate(supernet: nn.Module, arch: dict[str, Any]) -> None:
    """Make the one-shot ``supernet`` compute the subnet ``arch`` (weights shared, nothing copied)."""
    memo = dict(arch)
    for module in _supernet_modules(supernet):
        module.resample(memo=memo)


def train_supernet(config: dict[str, Any] | None = None, settings: TrainSettings = TrainSettings(epochs=20),
                   seed: int = 0) -> nn.Module:
    """The AutoFormer supernet of ``config`` (default: ``micro``), each step on a uniformly sampled subnet."""
    from retia.spaces.autoformer import AutoformerSpace

    from .family import _autoformer_sample

    config = config or AutoformerSpace.config("micro")
    torch.manual_seed(seed)
    supernet = AutoformerSpace.build_supernet(config)
    rng = random.Random(f"supernet:{seed}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        activate(supernet, _autoformer_sample(rng))
        return supernet(x)

    return train_model(supernet, digits_split(config.get("img_size", 32)), dataclasses.replace(settings, seed=seed),
                       forward=forward)


@torch.no_grad()
def subnet_features(supernet: nn.Module, arch: dict[str, Any], images: torch.Tensor, width: int,
                    batch_size: int = 512) -> torch.Tensor:
    """Pooled latent features ``[N, width]`` of ``images`` through the frozen subnet ``arch`` (zero-padded)."""
    captured: list[torch.Tensor] = []
    handle = supernet.head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    try:
        supernet.eval()
        activate(supernet, arch)
        for start in range(0, len(images), batch_size):
            supernet(images[start:start + batch_size])
    finally:
        handle.remove()
    feats = torch.cat(captured)
    return nn.functional.pad(feats, (0, width - feats.shape[1]))


class SharedHead(nn.Sequential):
    """The task head shared by all subnets: linear, GELU, linear."""

    def __init__(self, width: int, classes: int = 10, hidden: int = 128) -> None:
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, classes))


def _fit_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    settings = TrainSettings(epochs=epochs, batch_size=128, lr=lr, weight_decay=0.0, warmup=0.0, seed=seed)
    return train_model(head, (x, y), settings)


def _top1(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((head(x).argmax(1) == y).float().mean())


def train_shared_head(supernet: nn.Module, archs: Sequence[dict[str, Any]], width: int, epochs: int = 5,
                      lr: float = 2e-3, seed: int = 0) -> SharedHead:
    """One head trained on the features of all ``archs`` (every subnet's view of every training image)."""
    x_tr, y_tr, _, _ = digits_split(32)
    feats = torch.cat([subnet_features(supernet, a, x_tr, width) for a in archs])
    labels = y_tr.repeat(len(archs))
    torch.manual_seed(seed)
    return _fit_head(SharedHead(width), feats, labels, epochs, lr, seed)


def cheap_label(supernet: nn.Module, head: SharedHead, arch: dict[str, Any], width: int, ft_epochs: int = 2,
                lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """``{'shared_top1': head as is, 'cheap_top1': after fine-tuning a copy on this arch}`` (validation, %)."""
    x_tr, y_tr, x_va, y_va = digits_split(32)
    f_tr, f_va = subnet_features(supernet, arch, x_tr, width), subnet_features(supernet, arch, x_va, width)
    out = {"shared_top1": _top1(head, f_va, y_va)}
    tuned = _fit_head(copy.deepcopy(head), f_tr, y_tr, ft_epochs, lr, seed) if ft_epochs else head
    out["cheap_top1"] = _top1(tuned, f_va, y_va)
    return out


def label_family_shared_head(path: str | Path, supernet_epochs: int = 20, head_archs: int = 24,
                             head_epochs: int = 5, ft_epochs: int = 2, seed: int = 0,
                             progress: bool = True) -> dict[str, Any]:
    """Cheap labels for every arch of the AutoFormer family file ``path``, compared with its trained labels.

    The head is trained on ``head_archs`` subnets sampled apart from the family (another seed; family archs that
    happen to be drawn are skipped). Writes ``<stem>.shared_head.json`` and ``<stem>.supernet.safetensors``;
    returns the agreement (``srcc``, ``kendall``, ``n``, for both the fine-tuned and the untouched head).
    """
    from retia.spaces.autoformer import SUPERNET_KIND, AutoformerSpace
    from retia.weights import save_weights

    path = Path(path)
    graphs, full = load_family(path)
    spaces = {g.meta.get("space") for g in graphs}
    if spaces != {"autoformer"}:
        raise RetiaError(f"shared head: family {str(path)!r} holds {sorted(map(str, spaces))} archs, expected "
                         "autoformer only")
    start = time.perf_counter()
    config = AutoformerSpace.config("micro")
    width = max(config["search_embed_dim"])
    if progress:
        print(f"shared head: training the supernet ({supernet_epochs} epochs) ...", flush=True)
    supernet = train_supernet(config, TrainSettings(epochs=supernet_epochs), seed=seed)
    save_weights(supernet.state_dict(), path.with_name(path.stem + ".supernet.safetensors"),
                 {"kind": SUPERNET_KIND, "config": config})
    family_keys = {json.dumps(g.meta["arch"], sort_keys=True) for g in graphs}
    pool = [a for a in sample_archs(get_space("autoformer"), head_archs + len(graphs), seed=seed + 1000)
            if json.dumps(a, sort_keys=True) not in family_keys][:head_archs]
    head = train_shared_head(supernet, pool, width, epochs=head_epochs, seed=seed)
    iterator: Any = graphs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(graphs, desc="shared-head labels", unit="arch", file=sys.stdout)
    per_arch = {g.name: cheap_label(supernet, head, g.meta["arch"], width, ft_epochs=ft_epochs, seed=seed)
                for g in iterator}
    cheap = [per_arch[g.name]["cheap_top1"] for g in graphs]
    shared = [per_arch[g.name]["shared_top1"] for g in graphs]
    report = {**rank_agreement(cheap, full), "no_finetune": rank_agreement(shared, full),
              "seconds": round(time.perf_counter() - start, 1), "supernet_epochs": supernet_epochs,
              "head_archs": len(pool), "head_epochs": head_epochs, "ft_epochs": ft_epochs, "seed": seed}
    out = {"report": report, "labels": {g.name: {**per_arch[g.name], "top1": float(y)} for g, y in zip(graphs, full)}}
    path.with_name(path.stem + ".shared_head.json").write_text(json.dumps(out, indent=2) + "\n")
    return report
