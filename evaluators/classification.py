"""Image-classification training as an NNI Lightning evaluator (AutoFormer's recipe, usable for any space).

AdamW with linear warmup then cosine decay (per step), label smoothing, mixup / cutmix (timm), top-1 / top-5
(torchmetrics). Under NNI's ``RandomOneShot`` this module trains a weight-sharing supernet: each step runs one
uniformly sampled subnet. Hyperparameters are saved (``self.hparams``), logs go to TensorBoard and CSV, weights
are written as safetensors with a JSON sidecar at the end of every epoch — no pickled checkpoints.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import nni
import pytorch_lightning as pl
import torch
import torchmetrics
from nni.nas.evaluator.pytorch import Lightning, LightningModule, Trainer
from torch import nn

from ..errors import RetiaError
from ..weights import load_weights, save_weights
from .optim import adamw_warmup_cosine, warmup_cosine  # noqa: F401 (warmup_cosine: re-exported)

_logger = logging.getLogger(__name__)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """No weight decay on biases, norms, tokens and position tables (as timm / AutoFormer)."""
    return p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) or "embeddings_table" in name


class ReportTop1ToNNI:
    """Lightning-module mixin: inside an NNI trial (``hparams.report_to_nni``), report validation top-1 in % after
    each epoch and as the final result at the end, the metric every retia classification search ranks by."""

    def _top1_percent(self) -> float | None:
        if not self.hparams.report_to_nni or nni.get_current_parameter() is None:
            return None
        value = self.trainer.callback_metrics.get("val_top1")
        return None if value is None else 100.0 * float(value)

    def on_validation_epoch_end(self):
        top1 = self._top1_percent()
        if top1 is not None and not self.trainer.sanity_checking:
            nni.report_intermediate_result(top1)

    def on_fit_end(self):
        top1 = self._top1_percent()
        if top1 is not None:
            nni.report_final_result(top1)


class ClassificationModule(ReportTop1ToNNI, LightningModule):
    """Supervised classification with the AutoFormer training recipe (see the module docstring)."""

    def __init__(self, num_classes: int, learning_rate: float = 5e-4, weight_decay: float = 0.05,
                 warmup_epochs: float = 5, min_lr: float = 1e-5, warmup_lr: float = 1e-6,
                 label_smoothing: float = 0.1, mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5, report_to_nni: bool = True, init_weights: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.top1 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1)
        self.top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes))
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                                  num_classes=num_classes)

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        # Fine-tuning: start from pretrained (super)net weights; tensors whose shape differs (a classifier head for
        # another class count) keep their fresh initialisation.
        if self.hparams.init_weights:
            load_matching(self.model, self.hparams.init_weights)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup_fn is not None and x.shape[0] % 2 == 0:
            x, soft = self.mixup_fn(x, y)
            loss = torch.sum(-soft * torch.log_softmax(self(x), dim=-1), dim=-1).mean()
        else:
            loss = nn.functional.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.top1(logits, y)
        self.top5(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=False)
        self.log("val_top1", self.top1, prog_bar=True)
        self.log("val_top5", self.top5, prog_bar=False)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.trainer, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
                                   warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr,
                                   no_decay=_no_decay)



def load_matching(model: nn.Module, path: str) -> list[str]:
    """Load the tensors of ``path`` whose name and shape match ``model``; returns the names left as they were."""
    state = load_weights(path)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(kept) < len(own) // 2:
        raise RetiaError(f"weights {path!r} do not fit this model ({len(kept)}/{len(own)} tensors match)")
    model.load_state_dict(kept, strict=False)
    skipped = sorted(set(own) - set(kept))
    if skipped:
        _logger.warning("kept the fresh initialisation of %s (not in %s or another shape)", ", ".join(skipped), path)
    return skipped


class SafetensorsCheckpoint(pl.Callback):
    """Writes ``module_fn()``'s weights to ``<dirpath>/last.safetensors`` (+ JSON sidecar with ``meta``) after
    every epoch, and to ``best.safetensors`` when ``monitor`` improves."""

    def __init__(self, dirpath: str | Path, module_fn: Callable[[], nn.Module], meta: dict[str, Any],
                 monitor: str = "val_top1"):
        super().__init__()
        self.dirpath, self.module_fn, self.meta, self.monitor = Path(dirpath), module_fn, meta, monitor
        self.best = -math.inf

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        meta = dict(self.meta, epoch=trainer.current_epoch, metrics=metrics)
        state = self.module_fn().state_dict()
        save_weights(state, self.dirpath / "last.safetensors", meta)
        score = metrics.get(self.monitor)
        if score is not None and score > self.best:
            self.best = score
            save_weights(state, self.dirpath / "best.safetensors", meta)


def make_trainer(max_epochs: int, log_dir: str | Path, callbacks: list[pl.Callback] | None = None, *,
                 accelerator: str = "auto", devices: int | str = "auto", strategy: str = "auto",
                 precision: str | None = None, limit_train_batches: float | int | None = None,
                 limit_val_batches: float | int | None = None, enable_progress_bar: bool = True,
                 **trainer_kwargs: Any) -> Trainer:
    """The NNI-traced Lightning ``Trainer`` every retia evaluator uses: TensorBoard + CSV logs under ``log_dir``, no
    Lightning checkpoints (weights go through :class:`SafetensorsCheckpoint`), no sanity validation; unset
    options are left to Lightning's defaults. ``trainer_kwargs`` (e.g. ``num_nodes``, ``sync_batchnorm``) pass on."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if precision:
        trainer_kwargs["precision"] = precision
    if limit_train_batches is not None:
        trainer_kwargs["limit_train_batches"] = limit_train_batches
    if limit_val_batches is not None:
        trainer_kwargs["limit_val_batches"] = limit_val_batches
    return Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=devices, strategy=strategy,
        logger=[TensorBoardLogger(str(log_dir), name="tensorboard"), CSVLogger(str(log_dir), name="csv")],
        callbacks=callbacks or [], enable_checkpointing=False, enable_progress_bar=enable_progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10, **trainer_kwargs)


def classification_evaluator(datamodule: pl.LightningDataModule, num_classes: int, max_epochs: int,
                             log_dir: str | Path, callbacks: list[pl.Callback] | None = None,
                             accelerator: str = "auto", devices: int | str = "auto", strategy: str = "auto",
                             precision: str | None = None, num_nodes: int = 1, sync_batchnorm: bool = False,
                             limit_train_batches: float | int | None = None,
                             enable_progress_bar: bool = True, **module_kwargs: Any) -> Lightning:
    """An NNI ``Lightning`` evaluator training :class:`ClassificationModule` on ``datamodule``.

    ``devices`` / ``strategy`` / ``accelerator`` / ``num_nodes`` / ``sync_batchnorm`` go to Lightning's Trainer: e.g.
    ``devices=4, strategy="ddp"`` for four GPUs, ``num_nodes=2`` for two such nodes (under SLURM or torchrun).
    """
    trainer = make_trainer(max_epochs, log_dir, callbacks, accelerator=accelerator, devices=devices,
                           strategy=strategy, precision=precision, num_nodes=num_nodes, sync_batchnorm=sync_batchnorm,
                           limit_train_batches=limit_train_batches,
                           enable_progress_bar=enable_progress_bar)
    module = ClassificationModule(num_classes=num_classes, **module_kwargs)
    return Lightning(module, trainer, datamodule=datamodule)
