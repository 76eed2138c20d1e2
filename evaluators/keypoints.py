"""Human keypoints (COCO, top-down) as an NNI Lightning evaluator: heatmap MSE, decoding and COCO OKS AP.

The model (e.g. ``retia.spaces.hrnas.HRNet`` with ``task="keypoint"``) maps a person crop ``(3, H, W)`` to one
heatmap per joint at 1/4 of the input (:mod:`retia.data.keypoints` makes the crops and targets).

* Loss (the original's ``JointsMSELoss``): ½ · mean over batch, joints and pixels of
  ``(weight_j · (pred − target))²``; a joint with weight 0 (unlabelled) adds nothing.
* Decoding (HRNet's): per joint the heatmap argmax, moved a quarter pixel towards the higher of its two
  neighbours along each axis, times the stride, back through the inverse crop transform into image pixels;
  the joint score is the heatmap maximum; the person score is the mean of the joint scores above 0.2 (0 when
  none is), times the box score (1: ground-truth boxes).
* Metric: COCO keypoint AP / AR by pycocotools' ``COCOeval(gt, results, "keypoints")`` — OKS over the labelled
  joints, AP averaged over OKS thresholds 0.50:0.05:0.95, 101-point interpolation; ``AP`` is ``stats[0]``.

Training: AdamW (no weight decay on 1-d parameters), linear warmup then cosine decay per step
(:func:`retia.evaluators.optim.adamw_warmup_cosine`). Inside an NNI trial the validation AP in % is reported
after each epoch and as the final result.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from nni.nas.evaluator.pytorch import Lightning, LightningModule

from retia.data.keypoints import (COCO_SIGMAS, COCO_SKELETON, apply_affine, crop_transform, invert_affine,
                                  load_coco)
from retia.errors import RetiaError

from .classification import load_matching, make_trainer
from .optim import adamw_warmup_cosine
from .reporting import ReportScoreToNNI

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")  # COCOeval.stats order
SCORE_THRESHOLD = 0.2  # joint maxima above this make the person score (HRNet's in_vis_thre)


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------
def decode_heatmaps(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords (N, J, 2) as (x, y) in heatmap pixels, maxvals (N, J))``: the argmax of each map moved 0.25
    pixel towards its higher neighbour on each axis (where both neighbours exist), HRNet's sub-pixel guess."""
    n, j, h, w = heatmaps.shape
    flat = heatmaps.detach().float().reshape(n, j, h * w)
    maxvals, idx = flat.max(dim=-1)
    x, y = idx % w, idx // w

    def at(offset: int, ok: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, torch.where(ok, idx + offset, idx).unsqueeze(-1)).squeeze(-1)

    inner_x, inner_y = (x > 0) & (x < w - 1), (y > 0) & (y < h - 1)
    dx = torch.sign(at(1, inner_x) - at(-1, inner_x)) * 0.25 * inner_x
    dy = torch.sign(at(w, inner_y) - at(-w, inner_y)) * 0.25 * inner_y
    return torch.stack([x.float() + dx, y.float() + dy], dim=-1), maxvals


def heatmap_to_image(coords: np.ndarray | torch.Tensor, center: Any, scale: Any, input_size: Sequence[int],
                     stride: float = 4, rotation: Any = None) -> np.ndarray:
    """Heatmap positions ``(N, J, 2)`` → image pixels: × ``stride`` into the crop, then the inverse of the crop
    transform of each sample (``center`` / ``scale`` ``(N, 2)``, ``rotation`` ``(N,)`` degrees or None)."""
    coords = np.asarray(torch.as_tensor(coords, dtype=torch.float64).cpu()) * stride
    center = np.asarray(torch.as_tensor(center, dtype=torch.float64).cpu())
    scale = np.asarray(torch.as_tensor(scale, dtype=torch.float64).cpu())
    rot = np.zeros(len(coords)) if rotation is None else np.asarray(torch.as_tensor(rotation).cpu(), np.float64)
    return np.stack([apply_affine(c, invert_affine(crop_transform(ce, s, r, input_size)))
                     for c, ce, s, r in zip(coords, center, scale, rot)]) if len(coords) else coords


def instance_scores(maxvals: np.ndarray | torch.Tensor, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """Person scores ``(N,)``: the mean of each row's joint maxima above ``threshold`` (0 when none is)."""
    m = np.asarray(torch.as_tensor(maxvals, dtype=torch.float64).cpu())
    keep = m > threshold
    return np.where(keep.any(1), (m * keep).sum(1) / np.maximum(keep.sum(1), 1), 0.0)


def predict_batch(heatmaps: torch.Tensor, meta: dict[str, Any], input_size: Sequence[int],
                  threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints (N, J, 3) = image x, y and joint score, person scores (N,))`` of one batch of heatmaps
    with the reader's ``meta`` (centre, scale, rotation of each crop)."""
    coords, maxvals = decode_heatmaps(heatmaps)
    stride = input_size[1] / heatmaps.shape[-1]
    xy = heatmap_to_image(coords, meta["center"], meta["scale"], input_size, stride, meta.get("rotation"))
    m = maxvals.cpu().double().numpy()
    return np.concatenate([xy, m[..., None]], axis=-1), instance_scores(m, threshold)


# ---------------------------------------------------------------------------------------------------------------
# COCO results and AP
# ---------------------------------------------------------------------------------------------------------------
def coco_results(keypoints: np.ndarray, scores: Sequence[float], image_ids: Sequence[int],
                 category_id: int = 1) -> list[dict[str, Any]]:
    """The COCO results list (``image_id``, ``category_id``, ``keypoints`` [x, y, score]·J, ``score``), plain
    Python numbers so that it can be written as JSON."""
    return [{"image_id": int(i), "category_id": int(category_id),
             "keypoints": [round(float(v), 3) for v in np.asarray(k, dtype=np.float64).reshape(-1)],
             "score": float(s)} for k, s, i in zip(keypoints, scores, image_ids)]


def save_results(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write a COCO results list as JSON (the file pycocotools' ``loadRes`` and the COCO server read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def coco_keypoint_ap(coco_gt, results: list[dict[str, Any]] | str | Path) -> dict[str, float]:
    """COCO keypoint AP / AR of ``results`` (a list or a JSON file) against ``coco_gt`` (a pycocotools COCO or
    an annotation file): ``{"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}`` as
    fractions (pycocotools' ``stats``; −1 where an area range has no person). No results: all 0."""
    from pycocotools.cocoeval import COCOeval

    if not isinstance(coco_gt, (str, Path)) and not hasattr(coco_gt, "loadRes"):
        raise RetiaError(f"coco_gt {type(coco_gt).__name__}: expected a pycocotools COCO or an annotation file")
    gt = load_coco(coco_gt) if isinstance(coco_gt, (str, Path)) else coco_gt
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(list(results))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def object_keypoint_similarity(pred_xy: np.ndarray, gt_keypoints: np.ndarray, area: float,
                               sigmas: np.ndarray = COCO_SIGMAS) -> float:
    """COCO's OKS of one prediction ``(J, 2)`` against one labelled person (``gt_keypoints`` ``(J, 3)`` with
    visibility): mean over the labelled joints of exp(−d² / (2 · area · (2σ_j)²)); NaN with none labelled."""
    gt = np.asarray(gt_keypoints, dtype=np.float64).reshape(-1, 3)
    d2 = ((np.asarray(pred_xy, dtype=np.float64)[:, :2] - gt[:, :2]) ** 2).sum(1)
    e = d2 / (2 * area * (2 * sigmas) ** 2 + np.spacing(1))
    labelled = gt[:, 2] > 0
    return float(np.exp(-e[labelled]).mean()) if labelled.any() else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Lightning module
# ---------------------------------------------------------------------------------------------------------------
def joints_mse_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """½ · mean of ``(weight · (pred − target))²`` over batch, joints and pixels (HRNet's JointsMSELoss)."""
    if pred.shape != target.shape:
        raise RetiaError(f"heatmaps {tuple(pred.shape)}: expected the target's shape {tuple(target.shape)} "
                         "(one map per joint at 1/4 of the input)")
    w = weight.reshape(*weight.shape[:2], 1, 1).to(pred.dtype)
    return 0.5 * ((pred - target) * w).pow(2).mean()


class KeypointModule(ReportScoreToNNI, LightningModule):
    """Top-down keypoint training / COCO evaluation (see the module docstring). Logs ``train_loss``, ``lr``,
    ``val_loss``, ``val_ap`` and ``val_ap50`` (fractions); ``self.last_scores`` has every COCOeval statistic of
    the last validation and ``self.last_results`` its COCO results list. The validation ground truth comes from
    the datamodule's ``val_coco`` (or the validation dataset's ``coco``)."""

    def __init__(self, num_joints: int = 17, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_epochs: float = 1, min_lr: float = 1e-5, warmup_lr: float = 1e-6,
                 score_threshold: float = SCORE_THRESHOLD, report_to_nni: bool = True,
                 init_weights: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.last_scores: dict[str, float] | None = None
        self.last_results: list[dict[str, Any]] | None = None
        self._val_parts: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        if self.hparams.init_weights:
            load_matching(self.model, self.hparams.init_weights)

    def training_step(self, batch, batch_idx):
        x, target, weight, _ = batch
        loss = joints_mse_loss(self(x), target, weight)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def on_validation_epoch_start(self):
        self._val_parts = []

    def validation_step(self, batch, batch_idx):
        x, target, weight, meta = batch
        heatmaps = self(x)
        self.log("val_loss", joints_mse_loss(heatmaps, target, weight), prog_bar=False)
        kps, scores = predict_batch(heatmaps, meta, x.shape[-2:], self.hparams.score_threshold)
        self._val_parts.append((meta["index"].to(self.device), torch.as_tensor(kps, device=self.device),
                                torch.as_tensor(scores, device=self.device), meta["image_id"].to(self.device)))

    def _gathered(self) -> tuple[np.ndarray, ...]:
        """This epoch's (index, keypoints, scores, image ids) from every process, each sample once."""
        parts = [torch.cat(p) for p in zip(*self._val_parts)]
        if self.trainer.world_size > 1:
            parts = [self.all_gather(p).flatten(0, 1) for p in parts]
        index, kps, scores, ids = (p.cpu().numpy() for p in parts)
        _, first = np.unique(index, return_index=True)  # the distributed sampler pads with repeats
        return index[first], kps[first], scores[first], ids[first]

    def _val_coco(self):
        coco = getattr(getattr(self.trainer, "datamodule", None), "val_coco", None)
        if coco is None:
            coco = getattr(getattr(self.trainer.val_dataloaders, "dataset", None), "coco", None)
        if coco is None:
            raise RetiaError("KeypointModule: no COCO ground truth; expected a datamodule with val_coco or a "
                             "validation dataset with .coco (retia.data.keypoints)")
        return coco

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._val_parts:
            return
        _, kps, scores, ids = self._gathered()
        self.last_results = coco_results(kps, scores, ids)
        stats = coco_keypoint_ap(self._val_coco(), self.last_results)
        self.last_scores = stats
        self.log("val_ap", stats["AP"], prog_bar=True, sync_dist=False)
        self.log("val_ap50", stats["AP50"], prog_bar=False, sync_dist=False)
        self._report_score(stats["AP"])

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.trainer, learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
                                   warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr)


def keypoint_evaluator(datamodule: pl.LightningDataModule, max_epochs: int, log_dir: str | Path,
                       num_joints: int | None = None, callbacks: list[pl.Callback] | None = None,
                       accelerator: str = "auto", devices: int | str = "auto", strategy: str = "auto",
                       precision: str | None = None, num_nodes: int = 1, sync_batchnorm: bool = False,
                       limit_train_batches: float | int | None = None,
                       limit_val_batches: float | int | None = None, enable_progress_bar: bool = True,
                       **module_kwargs: Any) -> Lightning:
    """An NNI ``Lightning`` evaluator training :class:`KeypointModule` on ``datamodule`` (``num_joints``
    defaults to ``datamodule.num_joints``; ``module_kwargs`` go to the module).

    For safetensors weights each epoch pass ``retia.evaluators.classification.SafetensorsCheckpoint(...,
    monitor="val_ap")`` in ``callbacks``.
    """
    if num_joints is None:
        num_joints = getattr(datamodule, "num_joints", None)
        if num_joints is None:
            raise RetiaError("keypoint_evaluator: pass num_joints (the datamodule has no num_joints)")
    trainer = make_trainer(max_epochs, log_dir, callbacks, accelerator=accelerator, devices=devices,
                           strategy=strategy, precision=precision, num_nodes=num_nodes, sync_batchnorm=sync_batchnorm,
                           limit_train_batches=limit_train_batches,
                           limit_val_batches=limit_val_batches, enable_progress_bar=enable_progress_bar)
    module = KeypointModule(num_joints=num_joints, **module_kwargs)
    return Lightning(module, trainer, datamodule=datamodule)


# ---------------------------------------------------------------------------------------------------------------
# evaluation and plots outside Lightning
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_keypoints(net: torch.nn.Module, datamodule, limit: int | None = None,
                      threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(sample indices, keypoints (N, J, 3) in image pixels, person scores, image ids)`` of ``net`` (eval
    mode, on its own device) over the validation set (its first ``limit`` samples when given)."""
    datamodule.setup("validate")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    parts: list[tuple[np.ndarray, ...]] = []
    seen = 0
    try:
        for x, _, _, meta in datamodule.val_dataloader():
            kps, scores = predict_batch(net(x.to(device)), meta, x.shape[-2:], threshold)
            parts.append((meta["index"].numpy(), kps, scores, meta["image_id"].numpy()))
            seen += len(x)
            if limit is not None and seen >= limit:
                break
    finally:
        net.train(was_training)
    index, kps, scores, ids = (np.concatenate(p) for p in zip(*parts))
    n = len(index) if limit is None else min(limit, len(index))
    return index[:n], kps[:n], scores[:n], ids[:n]


def evaluate_keypoints(net: torch.nn.Module, datamodule, threshold: float = SCORE_THRESHOLD) -> dict[str, float]:
    """COCO keypoint AP / AR (:func:`coco_keypoint_ap`'s dict) of ``net`` on the whole validation set."""
    _, kps, scores, ids = predict_keypoints(net, datamodule, threshold=threshold)
    return coco_keypoint_ap(datamodule.val_coco, coco_results(kps, scores, ids))


# COCO joints 0-4 are the face, then left / right alternate (odd = left, even = right)
def _joint_colour(j: int) -> str:
    return "tab:olive" if j < 5 else ("tab:red" if j % 2 == 1 else "tab:blue")


def plot_coco(image: np.ndarray, keypoints: np.ndarray, path_or_ax: str | Path | Any,
              skeleton: Sequence[tuple[int, int]] = COCO_SKELETON, threshold: float = SCORE_THRESHOLD,
              gt: np.ndarray | None = None, title: str | None = None, line_width: float = 2.0,
              marker_size: float = 4.0):
    """Draw ``keypoints`` ``(J, 2|3)`` (image pixels, optional score or visibility) and the ``skeleton`` limbs
    (1-based pairs, COCO's) on ``image`` (HxWx3, uint8 or float in [0, 1]); joints whose third value is not
    above ``threshold`` are left out (0 keeps every joint of a ``v`` ∈ {1, 2} annotation). Person's left in
    red, right in blue, face in olive; ``gt`` ``(J, 3)`` adds the labelled ground truth as white crosses.
    ``path_or_ax``: a PNG path (written, returned) or a matplotlib axis (drawn on, returned)."""
    from retia.results import _pyplot

    kps = np.asarray(keypoints, dtype=np.float64)
    shown = kps[:, 2] > threshold if kps.shape[1] > 2 else np.ones(len(kps), dtype=bool)
    own_figure = isinstance(path_or_ax, (str, Path))
    plt = _pyplot()
    if own_figure:
        h, w = np.asarray(image).shape[:2]
        fig, ax = plt.subplots(figsize=(max(2.0, 4.0 * w / max(h, w)), max(2.0, 4.0 * h / max(h, w))))
    else:
        ax = path_or_ax
    ax.imshow(np.asarray(image))
    for a, b in skeleton:
        a, b = a - 1, b - 1
        if shown[a] and shown[b]:
            colour = _joint_colour(b) if _joint_colour(a) == _joint_colour(b) else "tab:green"
            ax.plot(kps[[a, b], 0], kps[[a, b], 1], "-", color=colour, linewidth=line_width)
    for j in np.flatnonzero(shown):
        ax.plot(kps[j, 0], kps[j, 1], "o", color=_joint_colour(j), markersize=marker_size,
                markeredgecolor="black", markeredgewidth=0.5)
    if gt is not None:
        g = np.asarray(gt, dtype=np.float64).reshape(-1, 3)
        ax.plot(g[g[:, 2] > 0, 0], g[g[:, 2] > 0, 1], "x", color="white", markersize=marker_size, mew=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    if not own_figure:
        return ax
    path = Path(path_or_ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_keypoint_predictions(net: torch.nn.Module, datamodule, path: str | Path, num: int = 8, cols: int = 4,
                              threshold: float = SCORE_THRESHOLD) -> Path:
    """A PNG grid of ``net``'s predictions on the first ``num`` validation people, drawn by :func:`plot_coco`
    on the whole images (so the mapping back from the crop shows), ground truth as white crosses, each
    titled with its OKS."""
    from retia.results import _pyplot

    index, kps, _, _ = predict_keypoints(net, datamodule, limit=num, threshold=threshold)
    dataset = datamodule.val_set
    rows = max(1, math.ceil(len(index) / cols))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i, k in zip(axes.flat, index, kps):
        rec = dataset.records[int(i)]
        gt = np.concatenate([rec["joints"], rec["visible"][:, None]], axis=1)
        ann = dataset.coco.loadAnns(rec["ann_id"])[0]
        oks = object_keypoint_similarity(k[:, :2], gt, ann["area"])
        plot_coco(dataset.read_image(int(i)), k, ax, threshold=threshold, gt=gt, title=f"OKS {oks:.2f}",
                  line_width=1.5, marker_size=3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
