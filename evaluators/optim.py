"""AdamW with linear warmup then cosine decay: the one optimizer recipe of retia's training modules and loops.

The update runs fused (one kernel for all tensors, ``torch.optim.AdamW(fused=True)``) wherever torch has that
kernel: on the CPU AdamW otherwise loops over the parameters in Python, and for the ~1,500 small tensors of an
HR-NAS supernet that loop was a third of a training step (``benchmarks/hrnas_step.py --optimizer adamw``). Same
update rule, results equal up to float rounding.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["warmup_cosine", "decay_groups", "adamw", "adamw_warmup_cosine"]

_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float = 1e-6,
                  min_lr: float = 1e-5) -> Callable[[int], float]:
    """Learning rate at a step: linear from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then cosine down to
    ``min_lr`` at ``total_steps``."""
    def lr(step: int) -> float:
        if step < warmup_steps:
            return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    return lr


def _no_decay_default(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1


def decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], weight_decay: float,
                 no_decay: Callable[[str, torch.Tensor], bool] = _no_decay_default) -> list[dict[str, Any]]:
    """Two parameter groups: ``weight_decay`` on the trainable tensors, none on those ``no_decay(name, p)`` picks
    (by default the 1-d ones: biases and norm scales)."""
    decay, keep = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _can_fuse(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)


def adamw(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
          weight_decay: float = 0.01) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or groups), fused where every tensor allows it."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [dict(g, params=list(g["params"])) for g in groups]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=_can_fuse(groups) or None)


def adamw_warmup_cosine(module: nn.Module, trainer, *, learning_rate: float, weight_decay: float,
                        warmup_epochs: float, warmup_lr: float, min_lr: float,
                        no_decay: Callable[[str, torch.Tensor], bool] = _no_decay_default) -> dict[str, Any]:
    """A Lightning ``configure_optimizers`` result: :func:`adamw` on ``module``'s :func:`decay_groups`, the rate
    stepped per batch by :func:`warmup_cosine` over ``trainer.estimated_stepping_batches`` with
    ``warmup_epochs`` of warmup. The warmup start and the cosine floor never exceed the base rate (a tiny rate
    stays tiny)."""
    optimizer = adamw(decay_groups(module.named_parameters(), weight_decay, no_decay), lr=learning_rate)
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = max(1, trainer.max_epochs or 1)
    warmup = int(total * min(warmup_epochs, epochs) / epochs)
    schedule = warmup_cosine(total, warmup, learning_rate, min(warmup_lr, learning_rate), min(min_lr, learning_rate))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / learning_rate)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
