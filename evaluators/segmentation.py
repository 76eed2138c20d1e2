"""Semantic segmentation as an NNI Lightning evaluator: cross-entropy, mIoU and pixel accuracy.

The model (e.g. ``retia.spaces.hrnas.HRNet`` with ``task="segmentation"``) returns logits at any resolution
(HR-NAS: 1/4 of the input); they are bilinearly upsampled to the label size for the loss and the metric.
Pixels labelled ``ignore_index`` (255) count for neither.

**mIoU** (:class:`SegmentationMetrics`, a torchmetrics ``Metric`` over a confusion matrix summed across batches
and processes): IoU_c = TP_c / (TP_c + FP_c + FN_c) per class, mIoU = mean over the classes that occur in the
predictions or the labels of the whole evaluation (a class absent from both has no IoU — 0/0 — and is left out
of the mean, as mmsegmentation's ``nanmean`` and torchmetrics' ``MulticlassJaccardIndex(average="macro")`` do);
pixel accuracy = Σ TP / labelled pixels. With no labelled pixel at all both are NaN.

Training: AdamW (no weight decay on 1-d parameters: biases, BN), linear warmup then cosine decay per step
(:func:`retia.evaluators.optim.adamw_warmup_cosine`). Inside an NNI trial the validation mIoU in % is
reported after each epoch and as the final result.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from nni.nas.evaluator.pytorch import Lightning, LightningModule

from retia.errors import RetiaError

from .classification import load_matching, make_trainer
from .optim import adamw_warmup_cosine
from .reporting import ReportScoreToNNI

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------------------------
# metric
# ---------------------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = target class, columns = predicted class; pixels whose
    target is ``ignore_index`` (or outside ``0..num_classes-1``) are skipped. ``pred`` and ``target`` are
    integer tensors of the same shape."""
    if pred.shape != target.shape:
        raise RetiaError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise RetiaError(f"predictions outside 0..{num_classes - 1}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"iou": per-class IoU (NaN for a class absent from predictions and labels), "miou": their mean over
    the classes that have one, "pixel_acc": Σ TP / Σ counts, "acc": per-class recall (NaN without labels)}``."""
    cm = confmat.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    support = cm.sum(1)
    acc = torch.where(support > 0, tp / support.clamp(min=1), torch.full_like(tp, math.nan))
    total = cm.sum()
    return {"iou": iou, "miou": iou.nanmean(), "acc": acc,
            "pixel_acc": tp.sum() / total if total > 0 else torch.tensor(math.nan, dtype=cm.dtype)}


class SegmentationMetrics(torchmetrics.Metric):
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix summed over updates (and DDP processes).

    ``update(preds, target)``: ``preds`` either class ids ``(N, H, W)`` or logits ``(N, C, h, w)`` (upsampled
    bilinearly to the target size when they differ, then argmax); ``target`` ``(N, H, W)`` with
    ``ignore_index`` for unlabelled pixels. ``compute()`` returns :func:`scores_from_confusion`'s dict.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if preds.is_floating_point():
            if preds.ndim != 4 or preds.shape[1] != self.num_classes:
                raise RetiaError(f"logits {tuple(preds.shape)}: expected (N, {self.num_classes}, H, W)")
            if preds.shape[-2:] != target.shape[-2:]:
                preds = F.interpolate(preds, size=target.shape[-2:], mode="bilinear", align_corners=False)
            preds = preds.argmax(1)
        self.confmat += confusion_matrix(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, torch.Tensor]:
        return scores_from_confusion(self.confmat)


# ---------------------------------------------------------------------------------------------------------------
# Lightning module
# ---------------------------------------------------------------------------------------------------------------
class ReportMIoUToNNI(ReportScoreToNNI):
    """Lightning-module mixin: inside an NNI trial (``hparams.report_to_nni``), report validation mIoU in %
    after each epoch and as the final result at the end (the segmentation counterpart of
    :class:`retia.evaluators.classification.ReportTop1ToNNI`). The module calls :meth:`_report_miou` with each
    epoch's value."""

    def _report_miou(self, miou: float) -> None:
        self._report_score(miou)


class SegmentationModule(ReportMIoUToNNI, LightningModule):
    """Supervised semantic segmentation (see the module docstring). Logs ``train_loss``, ``lr``, ``val_loss``,
    ``val_miou``, ``val_pixel_acc`` (fractions in [0, 1]); ``self.last_scores`` holds the last validation's
    per-class IoU as well."""

    def __init__(self, num_classes: int, learning_rate: float = 2e-3, weight_decay: float = 0.01,
                 warmup_epochs: float = 1, min_lr: float = 1e-5, warmup_lr: float = 1e-6,
                 ignore_index: int = IGNORE_INDEX, report_to_nni: bool = True, init_weights: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.last_scores: dict[str, Any] | None = None

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        if self.hparams.init_weights:
            load_matching(self.model, self.hparams.init_weights)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        if not (y != self.hparams.ignore_index).any():  # nothing labelled: zero loss, graph kept for DDP
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits, y, ignore_index=self.hparams.ignore_index), logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, _ = self._loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self._loss(self(x), y)
        self.val_metrics.update(logits.argmax(1), y)
        self.log("val_loss", loss, prog_bar=False)

    def on_validation_epoch_end(self):
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        self.log("val_miou", scores["miou"].float(), prog_bar=True)
        self.log("val_pixel_acc", scores["pixel_acc"].float(), prog_bar=False)
        self.last_scores = {"miou": float(scores["miou"]), "pixel_acc": float(scores["pixel_acc"]),
                            "iou": [float(v) for v in scores["iou"]]}
        self._report_miou(float(scores["miou"]))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.trainer, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
                                   warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr)


def segmentation_evaluator(datamodule: pl.LightningDataModule, max_epochs: int, log_dir: str | Path,
                           num_classes: int | None = None, callbacks: list[pl.Callback] | None = None,
                           accelerator: str = "auto", devices: int | str = "auto", strategy: str = "auto",
                           precision: str | None = None, num_nodes: int = 1, sync_batchnorm: bool = False,
                           limit_train_batches: float | int | None = None,
                           limit_val_batches: float | int | None = None, enable_progress_bar: bool = True,
                           **module_kwargs: Any) -> Lightning:
    """An NNI ``Lightning`` evaluator training :class:`SegmentationModule` on ``datamodule``
    (``num_classes`` defaults to ``datamodule.num_classes``; ``module_kwargs`` go to the module).

    For safetensors weights each epoch pass ``retia.evaluators.classification.SafetensorsCheckpoint(...,
    monitor="val_miou")`` in ``callbacks``.
    """
    if num_classes is None:
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is None:
            raise RetiaError("segmentation_evaluator: pass num_classes (the datamodule has no num_classes)")
    trainer = make_trainer(max_epochs, log_dir, callbacks, accelerator=accelerator, devices=devices,
                           strategy=strategy, precision=precision, num_nodes=num_nodes, sync_batchnorm=sync_batchnorm,
                           limit_train_batches=limit_train_batches,
                           limit_val_batches=limit_val_batches, enable_progress_bar=enable_progress_bar)
    module = SegmentationModule(num_classes=num_classes, **module_kwargs)
    return Lightning(module, trainer, datamodule=datamodule)
