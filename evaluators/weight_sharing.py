"""Scoring subnets that inherit a trained supernet's weights: top-1 / top-5 on a validation set.

Used as an NNI ``FunctionalEvaluator``: NNI hands the function the frozen subnet (weights copied from the
supernet), it measures accuracy, params and FLOPs, writes the trial to the run directory and reports top-1.
A trial already in the run directory (a resumed search re-proposing it) is answered from there, not re-run.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import nni
import torch
from nni.nas.evaluator import FunctionalEvaluator
from torch import nn

from ..profile import count_flops, count_params
from ..results import RunDir, arch_key


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu",
             topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (in %) of ``model`` over ``batches`` of ``(images, labels)``."""
    model.eval().to(device)
    correct = {k: 0 for k in topk}
    seen = 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        ranked = logits.topk(max(topk), dim=1).indices
        for k in topk:
            correct[k] += (ranked[:, :k] == labels[:, None]).any(dim=1).sum().item()
        seen += labels.numel()
    return {f"top{k}": 100.0 * correct[k] / max(1, seen) for k in topk}


class SubnetScorer:
    """The evaluation function of a weight-sharing search (see the module docstring)."""

    def __init__(self, run: RunDir, val_loader_fn: Callable[[], Iterable], input_shape: tuple[int, ...],
                 device: str = "cpu", param_counter: Callable[[dict], int] | None = None,
                 flops_counter: Callable[[dict], int] | None = None):
        self.run, self.val_loader_fn, self.input_shape = run, val_loader_fn, (1,) + tuple(input_shape)[1:]
        self.device, self.param_counter = device, param_counter
        self.flops_counter = flops_counter
        self._loader = None
        self.evaluated = 0  # subnets actually run in this process (cache hits excluded)

    def _cached(self) -> dict[str, dict]:
        return {arch_key(t["arch"]): t for t in self.run.trials()}

    def __call__(self, model: nn.Module) -> None:
        arch = dict(nni.get_current_parameter().sample)
        previous = self._cached().get(arch_key(arch))
        if previous is not None:
            nni.report_final_result(previous["top1"])
            return
        start = time.perf_counter()
        if self._loader is None:
            self._loader = self.val_loader_fn()
        scores = accuracy(model, self._loader, self.device)
        record: dict[str, Any] = {
            "trial": len(self.run.trials()) + 1,
            "arch": arch,
            "params": self.param_counter(arch) if self.param_counter else count_params(model),
            "flops": self.flops_counter(arch) if self.flops_counter else count_flops(model, self.input_shape),
            **scores,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.evaluated += 1
        self.run.log_trial(record)
        nni.report_final_result(record["top1"])

    def evaluator(self) -> FunctionalEvaluator:
        return FunctionalEvaluator(self)
