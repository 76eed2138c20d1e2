"""Labelled architecture families (AIO-P's ground truth): sample N archs of a retia space, train each briefly on a
task and store arch, graph, the task's metric, FLOPs and params in one graph file.

AIO-P's test families are individually trained architectures (``run_train_cgs_on_task.py``); here they are
trained on small embedded data sets so that a family of ~32 tiny nets takes minutes on one CPU thread. A family
space (:class:`FamilySpace`) has a task (:class:`FamilyTask`: data, loss, evaluation, metric name):

- ``autoformer`` (classification, ``top1``): subnets of the AutoFormer ``micro`` preset (32² input, 8×8 patches),
  uniformly sampled labels;
- ``zennas`` (classification, ``top1``): Zen-NAS ``XXBL`` networks from ``random_structure`` with every width
  halved (8..64 channels) and a 16² input (the 8×8 digits upsampled), so a net trains in seconds;
- ``hrnas-seg`` (segmentation, ``miou``): HR-NAS ``tiny`` with the segmentation head (4 classes, 32² input),
  channels per kernel branch and tokens per transformer drawn around a per-arch keep ratio
  (:func:`hrnas_seg_sample`), trained on a fixed split of the embedded synthetic shapes
  (:func:`retia.data.segmentation.synthetic_shapes`);
- ``hrnas-kp`` (keypoints, ``ap``): HR-NAS ``tiny`` with the keypoint head (17 COCO joints, 64×48 person crops,
  16×12 heatmaps), archs drawn as for ``hrnas-seg`` (:func:`hrnas_kp_sample`), fine-tuned on a fixed split of the
  embedded synthetic people (:func:`people_split`) from weights inherited from a parent network trained once per
  recipe (the full ``tiny`` net; each arch keeps its most important channels / tokens by BN scale, as HR-NAS's
  shrinking ranks them — AIO-P's OFA families likewise start from their supernet's weights). From scratch, a few
  CPU seconds per arch leave the tiny HRNet at AP ~0.01 (the mean-pose level): too little to rank archs by.

Classification trains on in-memory tensors of the fixed digits split of :class:`retia.data.DigitsDataModule`;
the label is top-1 in % on its 359 validation digits (:func:`retia.evaluators.weight_sharing.accuracy`).
Segmentation trains with cross-entropy on logits upsampled to the label size; the label is validation mIoU as a
fraction (:class:`retia.evaluators.segmentation.SegmentationMetrics`, the project's confusion-matrix mIoU).
Keypoints train with HRNet's heatmap MSE (:func:`retia.evaluators.keypoints.joints_mse_loss`); the label is COCO
OKS AP as a fraction (pycocotools' COCOeval through :func:`retia.evaluators.keypoints.coco_keypoint_ap`, the
heatmaps decoded by :func:`~retia.evaluators.keypoints.predict_batch`). All
use AdamW with :func:`retia.evaluators.optim.warmup_cosine` (no decay on biases / norms / tokens, linear
warmup then cosine per step). Everything is seeded (arch i of a family trains with seed ``settings.seed + i``),
so a label can be reproduced; :func:`noise_ceiling` retrains archs with another seed to measure how reproducible
the labels are.

Files: ``family.safetensors`` + ``family.json`` (:func:`retia.evaluators.aiop.save_graphs`; each graph's ``meta``
holds ``space``, ``arch``, the labels and ``seconds``; the file's meta holds the family header and ``metric``)
and ``family.labels.jsonl``, a journal appended and flushed after every arch. The journal is the source of truth:
a killed run keeps every finished arch, and the same command continues where it stopped (graphs are rebuilt from
the journal's archs, labels are not re-trained).

Command::

    python -m retia.evaluators.aiop.family --space autoformer --n 40 -o family.safetensors
    python -m retia.evaluators.aiop.family --space hrnas-seg --n 32 -o seg.safetensors --noise-ceiling 16
    python -m retia.evaluators.aiop.family --space hrnas-kp --n 32 -o kp.safetensors --noise-ceiling 12
    python -m retia.evaluators.aiop.family --space autoformer --n 40 -o family.safetensors --shared-head
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from retia.cache import cache_root
from retia.errors import RetiaError

from .graph import CompGraph, build_graph, load_graphs, save_graphs

__all__ = ["SPACES", "TASKS", "TrainSettings", "FamilyTask", "FamilySpace", "get_space", "sample_archs",
           "digits_split", "shapes_split", "people_split", "PeopleSplit", "train_model", "evaluate_model",
           "evaluate_segmentation", "evaluate_keypoints", "predict_people", "people_scores", "label_arch",
           "arch_graph", "hrnas_seg_sample", "hrnas_kp_sample", "hrnas_kp_config", "hrnas_kp_parent",
           "importance_keep", "build_family", "load_family", "family_labels", "family_metric", "family_header",
           "noise_ceiling", "default_family_file", "journal_path", "main"]

FAMILY_FORMAT = "retia.aiop.family/1"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------------------------
# training settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Brief training of one arch: AdamW, ``warmup`` (a fraction of the steps) then cosine down to ``min_lr``."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    min_lr: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise RetiaError(f"epochs {self.epochs!r}: expected a positive integer")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RetiaError(f"batch size {self.batch_size!r}: expected a positive integer")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise RetiaError(f"lr={self.lr!r}, warmup={self.warmup!r}, weight_decay={self.weight_decay!r}: "
                             "expected lr > 0, 0 <= warmup < 1, weight_decay >= 0")


# ---------------------------------------------------------------------------------------------------------------
# tasks: data, loss, evaluation, metric
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def digits_split(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: the embedded digits at ``image_size``², split as
    :class:`retia.data.DigitsDataModule` splits them (seed 0, 20 % validation)."""
    from retia.data.digits import digits_tensors, split_indices

    images, labels = digits_tensors(image_size)
    train, val = split_indices(len(labels), 0.2, 0)
    return images[train], labels[train], images[val], labels[val]


SHAPES_VAL_SEED = 1_000_003  # as SyntheticShapesDataModule: validation images from another seed than training


@functools.lru_cache(maxsize=4)
def shapes_split(image_size: int, num_train: int = 160, num_val: int = 96, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: a fixed split of the embedded synthetic shapes
    (:func:`retia.data.segmentation.synthetic_shapes`; 4 classes, label maps ``(N, S, S)``), training images from
    ``seed`` and validation images from ``seed + 1_000_003`` as :class:`retia.data.SyntheticShapesDataModule`."""
    from retia.data.segmentation import synthetic_shapes

    x_train, y_train = synthetic_shapes(num_train, image_size, seed)
    x_val, y_val = synthetic_shapes(num_val, image_size, seed + SHAPES_VAL_SEED)
    return x_train, y_train, x_val, y_val


def _classification_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def segmentation_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights sqrt(pixels / pixels of the class) over the labelled pixels of ``labels``,
    scaled to mean 1 (a class without pixels gets the largest weight of the others)."""
    from retia.data.segmentation import IGNORE_INDEX

    y = labels[labels != IGNORE_INDEX].reshape(-1)
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].double()
    w = torch.where(counts > 0, (counts.sum() / counts.clamp(min=1)).sqrt(), torch.zeros_like(counts))
    w = torch.where(counts > 0, w, w.max())
    return (w / w.mean()).float()


def _segmentation_loss(data: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with :func:`segmentation_class_weights` of the training labels (82 % of the synthetic
    shapes' pixels are background: unweighted, a short training predicts background everywhere), logits upsampled
    bilinearly to the label size (HR-NAS: logits at 1/4 of the input, as SegmentationModule)."""
    from retia.data.segmentation import IGNORE_INDEX, SHAPE_CLASSES

    weight = segmentation_class_weights(data[1], len(SHAPE_CLASSES))

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.shape[-2:] != y.shape[-2:]:
            out = nn.functional.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return nn.functional.cross_entropy(out, y, weight=weight, ignore_index=IGNORE_INDEX)

    return loss


def evaluate_model(model: nn.Module, data: Sequence[torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Top-1 / top-5 (%) on the validation part of ``data``."""
    from retia.evaluators.weight_sharing import accuracy

    x, y = data[2], data[3]
    return accuracy(model, [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data: Sequence[torch.Tensor], batch_size: int = 64
                          ) -> dict[str, float]:
    """``{'miou', 'pixel_acc'}`` (fractions) on the validation part of ``data``:
    :class:`retia.evaluators.segmentation.SegmentationMetrics` over all validation images (confusion matrix
    summed, logits upsampled bilinearly to the label size, then argmax)."""
    from retia.data.segmentation import SHAPE_CLASSES
    from retia.evaluators.segmentation import SegmentationMetrics

    x, y = data[2], data[3]
    metric = SegmentationMetrics(len(SHAPE_CLASSES))
    was_training = model.training
    model.eval()
    for i in range(0, len(y), batch_size):
        metric.update(model(x[i:i + batch_size]), y[i:i + batch_size])
    model.train(was_training)
    scores = metric.compute()
    return {"miou": float(scores["miou"]), "pixel_acc": float(scores["pixel_acc"])}


PEOPLE_IMAGE_SIZE = (96, 72)  # the synthetic people's images (build_keypoint_datamodule's default)


class PeopleSplit(NamedTuple):
    """A fixed keypoint split in memory (:func:`people_split`). ``y_train`` / ``y_val`` are sample indices (what
    :func:`train_model` batches); the training loss looks the heatmap targets and joint weights up by them, the
    evaluation the crops' centre / scale / image id."""

    x_train: torch.Tensor  # (N, 3, H, W) normalised person crops
    y_train: torch.Tensor  # (N,) arange: indices into targets / weights
    x_val: torch.Tensor    # (M, 3, H, W)
    y_val: torch.Tensor    # (M,) arange
    targets: torch.Tensor  # (N, 17, H/4, W/4) Gaussian heatmaps of the training crops
    weights: torch.Tensor  # (N, 17) 1 for a labelled joint on the heatmap, else 0
    val_meta: dict         # center (M, 2), scale (M, 2), rotation (M,), image_id (M,) of the validation crops
    coco: Any              # pycocotools COCO ground truth of the validation people


def _stack_people(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    items = [dataset[i] for i in range(len(dataset))]
    meta = {k: torch.stack([torch.as_tensor(m[k]) for *_, m in items]) for k in ("center", "scale", "rotation",
                                                                                 "image_id")}
    return (torch.stack([x for x, *_ in items]), torch.stack([t for _, t, _, _ in items]),
            torch.stack([w for _, _, w, _ in items]), meta)


def people_split(input_size: Sequence[int], num_train: int = 512, num_val: int = 128, sigma: float = 1.0,
                 seed: int = 0) -> PeopleSplit:
    """A fixed split of the embedded synthetic people (:func:`retia.data.keypoints.make_synthetic_coco`: one
    stick figure per 96×72 image, ``num_train`` training and ``num_val`` validation images of ``seed``, written once
    into the synthetic-data cache) read by :class:`retia.data.keypoints.COCOKeypoints` without augmentation:
    crops of ``input_size`` (h, w) from the ground-truth boxes, heatmap targets with ``sigma`` heatmap pixels.
    Built once per process and arguments."""
    from retia.data.keypoints import check_input_size

    size = check_input_size(tuple(input_size) if isinstance(input_size, list) else input_size)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise RetiaError(f"keypoint sigma {sigma!r}: expected a number > 0 (heatmap pixels)")
    return _people_split(size, num_train, num_val, float(sigma), seed)


@functools.lru_cache(maxsize=4)
def _people_split(input_size: tuple[int, int], num_train: int, num_val: int, sigma: float, seed: int
                  ) -> PeopleSplit:
    from retia.data.keypoints import COCOKeypoints, build_keypoint_datamodule

    dm = build_keypoint_datamodule(None, input_size=input_size, num_train=num_train, num_val=num_val,
                                   image_size=list(PEOPLE_IMAGE_SIZE), seed=seed, sigma=sigma)
    dm.prepare_data()
    x_train, targets, weights, _ = _stack_people(COCOKeypoints(dm.root, "train", input_size, sigma=sigma))
    val = COCOKeypoints(dm.root, "val", input_size, sigma=sigma)
    x_val, _, _, meta = _stack_people(val)
    return PeopleSplit(x_train, torch.arange(len(x_train)), x_val, torch.arange(len(x_val)), targets, weights,
                       meta, val.coco)


def _keypoint_loss(data: PeopleSplit) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """HRNet's JointsMSELoss (:func:`retia.evaluators.keypoints.joints_mse_loss`) against the heatmaps of the
    batch's sample indices."""
    from retia.evaluators.keypoints import joints_mse_loss

    def loss(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return joints_mse_loss(out, data.targets[idx], data.weights[idx])

    return loss


def people_scores(data: PeopleSplit, keypoints: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``{'ap', 'ap50', 'ap75', 'ar'}`` (fractions) of keypoints ``(M, 17, 3)`` in image pixels and person scores
    ``(M,)`` predicted for the validation crops, by COCOeval
    (:func:`retia.evaluators.keypoints.coco_keypoint_ap`)."""
    from retia.evaluators.keypoints import coco_keypoint_ap, coco_results

    stats = coco_keypoint_ap(data.coco, coco_results(keypoints, scores, data.val_meta["image_id"].tolist()))
    return {"ap": stats["AP"], "ap50": stats["AP50"], "ap75": stats["AP75"], "ar": stats["AR"]}


@torch.no_grad()
def predict_people(model: nn.Module, data: PeopleSplit, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints (M, 17, 3) in image pixels with joint scores, person scores (M,))`` of ``model`` on the
    validation crops, decoded as :class:`retia.evaluators.keypoints.KeypointModule` decodes them
    (:func:`~retia.evaluators.keypoints.predict_batch`: argmax + ¼ px, back through the crop transform; person
    score = mean joint maximum above 0.2); eval mode."""
    from retia.evaluators.keypoints import predict_batch

    was_training = model.training
    model.eval()
    kps, scores = [], []
    for i in range(0, len(data.y_val), batch_size):
        meta = {k: v[i:i + batch_size] for k, v in data.val_meta.items()}
        k, s = predict_batch(model(data.x_val[i:i + batch_size]), meta, data.x_val.shape[-2:])
        kps.append(k)
        scores.append(s)
    model.train(was_training)
    return np.concatenate(kps), np.concatenate(scores)


def evaluate_keypoints(model: nn.Module, data: PeopleSplit, batch_size: int = 64) -> dict[str, float]:
    """:func:`people_scores` of :func:`predict_people`: ``{'ap', 'ap50', 'ap75', 'ar'}`` on the validation
    people."""
    return people_scores(data, *predict_people(model, data, batch_size))


@dataclass(frozen=True)
class FamilyTask:
    """What a family's archs are trained and labelled on: ``data(space)`` -> ``(x_train, y_train, x_val, y_val)``,
    ``make_loss(data)`` -> the training ``loss(output, target)``, ``evaluate(model, data)`` -> labels (a dict
    holding ``metric``)."""

    name: str
    metric: str
    data: Callable[["FamilySpace"], Sequence[torch.Tensor]]
    make_loss: Callable[[Sequence[torch.Tensor]], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    evaluate: Callable[[nn.Module, Sequence[torch.Tensor]], dict[str, float]]


TASKS: dict[str, FamilyTask] = {
    "classification": FamilyTask("classification", "top1", lambda sp: digits_split(sp.resolution),
                                 lambda data: _classification_loss, evaluate_model),
    "segmentation": FamilyTask("segmentation", "miou", lambda sp: shapes_split(sp.resolution, **sp.data_args),
                               _segmentation_loss, evaluate_segmentation),
    "keypoints": FamilyTask("keypoints", "ap", lambda sp: people_split(sp.input_shape[2:], **sp.data_args),
                            _keypoint_loss, evaluate_keypoints),
}


# ---------------------------------------------------------------------------------------------------------------
# spaces
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpace:
    """How a family samples, builds and names its archs (a dict for AutoFormer / HR-NAS, a string for Zen-NAS),
    what it is trained on (``task``, a key of :data:`TASKS`; ``data_args`` for the task's data), its default
    label recipe (``settings``) and a description of anything else in its recipe (``recipe``, stored in the
    journal header of non-classification families so that a changed recipe refuses an old journal)."""

    name: str
    resolution: int
    sample: Callable[[random.Random], Any]
    build: Callable[[Any], nn.Module]
    task: str = "classification"
    settings: TrainSettings = TrainSettings(epochs=2)
    data_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    width: int | None = None  # input width when it is not ``resolution`` (the keypoint crops are h × w)
    # None: every arch starts from fresh weights (``build``); else ``make_init(space)`` -> ``init(arch)``, a network
    # of ``arch`` with inherited weights (``hrnas-kp``: sliced from a parent network trained once, see below)
    make_init: Callable[["FamilySpace"], Callable[[Any], nn.Module]] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.resolution, self.width or self.resolution)

    @property
    def family_task(self) -> FamilyTask:
        return TASKS[self.task]

    @property
    def metric(self) -> str:
        return TASKS[self.task].metric

    def data(self) -> Sequence[torch.Tensor]:
        return TASKS[self.task].data(self)

    @staticmethod
    def key(arch: Any) -> str:
        return json.dumps(arch, sort_keys=True)


@functools.lru_cache(maxsize=1)
def _autoformer_space():
    from retia.spaces.autoformer import AutoformerSpace

    config = AutoformerSpace.config("micro")
    return config, AutoformerSpace.from_config(config)


def _autoformer_sample(rng: random.Random) -> dict[str, Any]:
    _, space = _autoformer_space()
    labels = space.simplify()
    return space.complete_arch({k: rng.choice(list(m.values)) for k, m in sorted(labels.items())})


def _autoformer_build(arch: dict[str, Any]) -> nn.Module:
    from retia.spaces.autoformer import AutoformerSpace

    config, _ = _autoformer_space()
    return AutoformerSpace.build_subnet(arch, config)


def shrink_structure(structure: str, scale: float = 0.5) -> str:
    """A Zen-NAS structure with every output / bottleneck width times ``scale`` (multiples of 8, at least 8)."""
    from retia.spaces import zennas

    specs = []
    for b in zennas.parse(structure):
        changes = {f: max(8, int(round(getattr(b, f) * scale / 8)) * 8)
                   for f in ("out_channels", "bottleneck_channels") if hasattr(b, f)}
        specs.append(dataclasses.replace(b, **changes))
    return zennas.fix_channels(specs)


def _zennas_sample(rng: random.Random) -> str:
    from retia.spaces import zennas

    return shrink_structure(zennas.random_structure(rng, "XXBL"))


def _zennas_build(structure: str) -> nn.Module:
    from retia.spaces import zennas

    if not isinstance(structure, str):
        raise RetiaError(f"Zen-NAS arch {structure!r}: expected a structure string")
    return zennas.build(structure, num_classes=NUM_CLASSES)


HRNAS_SEG_RESOLUTION = 32


@functools.lru_cache(maxsize=1)
def hrnas_seg_config() -> dict[str, Any]:
    """HR-NAS ``tiny`` with the segmentation head: 4 classes (the synthetic shapes), 32² input."""
    from retia.data.segmentation import SHAPE_CLASSES
    from retia.spaces import hrnas

    return hrnas.preset("tiny", task="segmentation", num_classes=len(SHAPE_CLASSES), input_size=HRNAS_SEG_RESOLUTION)


def _hrnas_sample(config: dict[str, Any], rng: random.Random, keep_range: tuple[float, float], jitter: float,
                  drop: float) -> dict[str, int]:
    from retia.spaces import hrnas

    r = math.exp(rng.uniform(math.log(keep_range[0]), math.log(keep_range[1])))
    arch = {}
    for key, maximum in hrnas.arch_choices(config).items():
        if not key.endswith(".tokens") and rng.random() < drop:
            arch[key] = 0
            continue
        arch[key] = int(round(maximum * min(1.0, r * rng.uniform(1 - jitter, 1 + jitter))))
    return arch


def hrnas_seg_sample(rng: random.Random, keep_range: tuple[float, float] = (0.01, 1.0), jitter: float = 0.5,
                     drop: float = 0.15) -> dict[str, int]:
    """A random HR-NAS arch: a keep ratio ``r`` log-uniform in ``keep_range`` for the whole arch, then per key
    (hidden channels of a kernel branch, tokens of a transformer) ``round(max × min(1, r × U(1 - jitter,
    1 + jitter)))``; each kernel branch is also removed outright with probability ``drop`` (as progressive shrinking
    removes branches). So the family spans near-empty to full networks (MACs ~0.2M..11.5M at 32², about half of
    them below 2M) with uneven blocks."""
    return _hrnas_sample(hrnas_seg_config(), rng, keep_range, jitter, drop)


HRNAS_HEAD_INIT_STD = 0.01


def _hrnas_seg_build(arch: dict[str, int]) -> nn.Module:
    """``HRNet(config, arch)`` with fresh weights; the final 1×1 classifier re-initialised N(0, 0.01) with zero
    bias (as mmsegmentation's decode heads; HRNet's Kaiming fan-out init gives logits so large that a short
    training spends its first steps shrinking them)."""
    from retia.spaces import hrnas

    model = hrnas.HRNet(hrnas_seg_config(), arch)
    nn.init.normal_(model.classifier.weight, std=HRNAS_HEAD_INIT_STD)
    nn.init.zeros_(model.classifier.bias)
    return model


HRNAS_KP_INPUT = (64, 48)  # (h, w): the CPU keypoint search's crops (experiments/configs/hrnas/keypoint_cpu.yml)
HRNAS_KP_SIGMA = 1.0       # heatmap sigma in heatmap pixels, as the CPU keypoint search on the synthetic people
# the parent network every hrnas-kp arch inherits its weights from: the full `tiny` keypoint net trained once on the
# family's training people (256 steps of 8; validation AP ~0.35)
HRNAS_KP_PARENT = {"epochs": 4, "batch_size": 8, "lr": 5e-3, "weight_decay": 0.01, "seed": 0}


@functools.lru_cache(maxsize=1)
def hrnas_kp_config() -> dict[str, Any]:
    """HR-NAS ``tiny`` with the keypoint (heatmap) head: 17 COCO joints, 64×48 input, heatmaps at 1/4 (16×12)."""
    from retia.data.keypoints import NUM_JOINTS
    from retia.spaces import hrnas

    return hrnas.preset("tiny", task="keypoint", num_classes=NUM_JOINTS, input_size=list(HRNAS_KP_INPUT))


def hrnas_kp_sample(rng: random.Random, keep_range: tuple[float, float] = (0.01, 1.0), jitter: float = 0.5,
                    drop: float = 0.15) -> dict[str, int]:
    """A random arch of :func:`hrnas_kp_config`, drawn as :func:`hrnas_seg_sample` draws them (a log-uniform keep
    ratio for the whole arch, jittered per branch / transformer, branches dropped with probability ``drop``)."""
    return _hrnas_sample(hrnas_kp_config(), rng, keep_range, jitter, drop)


def _hrnas_kp_build(arch: dict[str, int]) -> nn.Module:
    """``HRNet(config, arch)`` with HRNet's keypoint init (every conv N(0, 0.001)); its graph is the family's."""
    from retia.spaces import hrnas

    return hrnas.HRNet(hrnas_kp_config(), arch)


def importance_keep(parent: nn.Module, arch: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """Which channels / tokens of ``parent`` (a full HR-NAS network) ``arch`` keeps: per kernel branch the
    ``arch[...]`` depthwise channels with the largest BN scale |γ|, per transformer the tokens with the largest
    |γ| of its input norm — the importance HR-NAS's progressive shrinking removes channels / tokens by (indices in
    ascending order, a :data:`retia.spaces.hrnas.network.Keep`)."""
    keep = {}
    for name, block in parent.named_blocks():
        entry = {}
        for k, bn in block.depthwise_bns().items():
            want = int(arch.get(f"{name}.k{k}", 0))
            if want:
                entry[f"k{k}"] = torch.topk(bn.weight.detach().abs(), want).indices.sort().values.cpu()
        want = int(arch.get(f"{name}.tokens", 0))
        if block.transformer is not None and want:
            gamma = block.transformer.input_norm.weight.detach().abs()
            entry["tokens"] = torch.topk(gamma, want).indices.sort().values.cpu()
        keep[name] = entry
    return keep


@functools.lru_cache(maxsize=2)
def _hrnas_kp_parent(key: str) -> nn.Module:
    from retia.spaces import hrnas
    from retia.weights import load_weights, save_weights

    spec = json.loads(key)
    settings = TrainSettings(**spec["parent"])
    path = cache_root() / f"aiop_hrnas_kp_parent_{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"
    with torch.random.fork_rng():  # the global random stream is left as it was, cached parent or not
        torch.manual_seed(settings.seed)
        model = hrnas.HRNet(spec["config"])
        if path.is_file():
            model.load_state_dict(load_weights(path))
            return model.eval()
        data = people_split(tuple(spec["config"]["input_size"]), **spec["data"])
        start = time.perf_counter()
        train_model(model, data, settings, loss=_keypoint_loss(data))
    scores = evaluate_keypoints(model, data)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.safetensors")
    save_weights(model.state_dict(), tmp, meta={**spec, "labels": scores,
                                                "seconds": round(time.perf_counter() - start, 1)})
    os.replace(tmp.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(tmp, path)
    return model.eval()


def hrnas_kp_parent(space: "FamilySpace") -> nn.Module:
    """The trained parent network of an ``hrnas-kp`` family space: the full network of :func:`hrnas_kp_config`
    trained by :func:`train_model` with ``space.recipe['parent']`` (settings, seed) on ``people_split(**
    space.data_args)``, once: kept in memory and as ``aiop_hrnas_kp_parent_<hash>.safetensors`` (+ JSON with its
    validation AP) in ``$RETIA_CACHE`` or ``~/.cache/retia``, the hash naming the config, data and settings."""
    if not isinstance(space.recipe.get("parent"), dict):
        raise RetiaError(f"family space {space.name!r} has no recipe['parent'] (expected the parent's training "
                         "settings: epochs, batch_size, lr, weight_decay, seed)")
    key = json.dumps({"config": hrnas_kp_config(), "data": dict(space.data_args),
                      "parent": dict(space.recipe["parent"]), "format": 1}, sort_keys=True)
    return _hrnas_kp_parent(key)


def _hrnas_kp_init(space: "FamilySpace") -> Callable[[dict[str, int]], nn.Module]:
    """``init(arch)``: the network of ``arch`` with the parent's weights of the channels / tokens
    :func:`importance_keep` picks (:func:`retia.spaces.hrnas.network.extract`: removed channels' constant outputs
    folded into the next BN, so in eval mode it computes the parent with those channels' scales at zero)."""
    from retia.spaces.hrnas.network import check_arch, extract

    parent = hrnas_kp_parent(space)

    def init(arch: dict[str, int]) -> nn.Module:
        model = extract(parent, importance_keep(parent, check_arch(parent.config, arch)))
        return model.train()

    return init


SPACES: dict[str, FamilySpace] = {
    "autoformer": FamilySpace("autoformer", 32, _autoformer_sample, _autoformer_build),
    "zennas": FamilySpace("zennas", 16, _zennas_sample, _zennas_build),
    "hrnas-seg": FamilySpace("hrnas-seg", HRNAS_SEG_RESOLUTION, hrnas_seg_sample, _hrnas_seg_build,
                             task="segmentation",
                             settings=TrainSettings(epochs=6, batch_size=16, lr=1e-2, weight_decay=0.01),
                             data_args={"num_train": 160, "num_val": 96},
                             recipe={"loss": "cross-entropy, sqrt inverse-frequency class weights",
                                     "classifier_init_std": HRNAS_HEAD_INIT_STD, "keep": "log-uniform 0.01..1"}),
    "hrnas-kp": FamilySpace("hrnas-kp", HRNAS_KP_INPUT[0], hrnas_kp_sample, _hrnas_kp_build, task="keypoints",
                            settings=TrainSettings(epochs=1, batch_size=16, lr=2e-3, weight_decay=0.01),
                            data_args={"num_train": 512, "num_val": 128, "sigma": HRNAS_KP_SIGMA},
                            recipe={"loss": "joints MSE (HRNet)", "input_size": list(HRNAS_KP_INPUT),
                                    "images": list(PEOPLE_IMAGE_SIZE), "augmentation": "none",
                                    "init": "inherited from the parent (top BN |gamma| channels and tokens)",
                                    "parent": dict(HRNAS_KP_PARENT), "keep": "log-uniform 0.01..1"},
                            make_init=_hrnas_kp_init,
                            width=HRNAS_KP_INPUT[1]),
}


def get_space(name: str) -> FamilySpace:
    if name not in SPACES:
        raise RetiaError(f"family space {name!r}: expected one of {', '.join(SPACES)}")
    return SPACES[name]


def _space(space: str | FamilySpace) -> FamilySpace:
    return get_space(space) if isinstance(space, str) else space


def sample_archs(space: str | FamilySpace, n: int, seed: int = 0) -> list[Any]:
    """``n`` distinct archs drawn in order from a ``seed``-ed generator; a longer list starts with the shorter one
    (so a family can grow by re-running with a larger ``n``)."""
    sp = _space(space)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RetiaError(f"family size {n!r}: expected a positive integer")
    rng = random.Random(f"{sp.name}:{seed}")
    out, seen = [], set()
    for _ in range(100 * n):
        arch = sp.sample(rng)
        key = sp.key(arch)
        if key not in seen:
            seen.add(key)
            out.append(arch)
            if len(out) == n:
                return out
    raise RetiaError(f"family size {n}: the {sp.name} space gave only {len(out)} distinct archs")


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # as ClassificationModule: no decay on biases, norms, tokens and position tables
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) or "embeddings_table" in name
             else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_model(model: nn.Module, data: Sequence[torch.Tensor], settings: TrainSettings,
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _classification_loss) -> nn.Module:
    """Train ``model`` in place on ``data`` (``x_train, y_train, ...``) with ``settings`` and ``loss`` (default:
    cross-entropy on class ids); seeded."""
    from retia.evaluators.optim import adamw, warmup_cosine

    x, y = data[0], data[1]
    forward = forward or model
    gen = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = -(-len(y) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    lr_at = warmup_cosine(total, int(total * settings.warmup), settings.lr, min(1e-6, settings.lr),
                          min(settings.min_lr, settings.lr))
    opt = adamw(_param_groups(model, settings.weight_decay), lr=settings.lr)
    model.train()
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            value = loss(forward(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            step += 1
    model.eval()
    return model


def label_arch(space: str | FamilySpace, arch: Any, settings: TrainSettings | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` (seeded), train it on its space's task and measure it: ``(trained model, labels)``, labels
    ``{'top1', 'top5', 'seconds'}`` (classification), ``{'miou', 'pixel_acc', 'seconds'}`` (segmentation) or
    ``{'ap', 'ap50', 'ap75', 'ar', 'seconds'}`` (keypoints).
    ``settings`` default: the space's own."""
    sp = _space(space)
    settings = sp.settings if settings is None else settings
    task = sp.family_task
    init = sp.build if sp.make_init is None else sp.make_init(sp)  # a parent is trained (once) here, untimed
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = init(arch)
    data = sp.data()
    train_model(model, data, settings, loss=task.make_loss(data))
    scores = task.evaluate(model, data)
    return model, {**scores, "seconds": round(time.perf_counter() - start, 3)}


def arch_graph(space: str | FamilySpace, arch: Any, name: str, labels: dict[str, Any] | None = None,
               model: nn.Module | None = None) -> CompGraph:
    """The graph of ``arch`` at the space's input shape (FLOPs and params profiled), its meta holding the space,
    the arch and ``labels``."""
    sp = _space(space)
    model = model if model is not None else sp.build(arch)
    return build_graph(model, sp.input_shape, name=name, meta={"space": sp.name, "arch": arch, **(labels or {})})


# ---------------------------------------------------------------------------------------------------------------
# family files
# ---------------------------------------------------------------------------------------------------------------
def journal_path(path: str | Path) -> Path:
    """``family.safetensors`` -> ``family.labels.jsonl``."""
    return Path(path).with_suffix(".labels.jsonl")


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    if not path.exists():
        return None, []
    header, rows = None, []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill: that arch is trained again
            continue
        if "header" in obj:
            header = obj["header"]
        else:
            rows.append(obj)
    return header, rows


def _append(path: Path, obj: dict) -> None:
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a line cut by a kill: start on a new line
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_family(graphs: list[CompGraph], path: Path, meta: dict[str, Any]) -> None:
    # write beside, then move into place: a reader never sees a half-written file
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    save_graphs(graphs, tmp, meta=meta)
    os.replace(tmp.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(tmp, path)


def family_header(space: str | FamilySpace, settings: TrainSettings, seed: int = 0) -> dict[str, Any]:
    """The journal header of a family: format, space, sampling seed, resolution and training settings, plus task,
    metric and data for a non-classification family (classification headers are as they always were, so older
    journals still match)."""
    sp = _space(space)
    header = {"format": FAMILY_FORMAT, "space": sp.name, "seed": seed, "resolution": sp.resolution,
              "train": dataclasses.asdict(settings)}
    if sp.task != "classification":
        header.update(task=sp.task, metric=sp.metric, data=dict(sp.data_args), recipe=dict(sp.recipe))
    return header


def default_family_file(folder: str | Path, space: str | FamilySpace, settings: TrainSettings, seed: int = 0
                        ) -> Path:
    """``folder/<space>-e<epochs>-s<seed>.safetensors`` when ``settings`` are the space's default recipe with
    another epoch count (the older names), else with a short hash of the settings appended, so different label
    settings never share a journal."""
    sp = _space(space)
    name = f"{sp.name}-e{settings.epochs}-s{seed}"
    base = dataclasses.replace(sp.settings, epochs=settings.epochs, seed=settings.seed)
    if settings != base:
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:6]
        name += f"-{digest}"
    return Path(folder) / f"{name}.safetensors"


def build_family(space: str | FamilySpace, n: int, path: str | Path, settings: TrainSettings | None = None,
                 seed: int = 0, progress: bool = True,
                 on_arch: Callable[[CompGraph, nn.Module], None] | None = None) -> list[CompGraph]:
    """Train and label ``n`` archs of ``space`` (sampled with ``seed``) into ``path`` (see the module docstring);
    ``settings`` default: the space's own recipe.

    Resumes from ``path``'s journal; a journal of other settings is refused. ``on_arch(graph, model)`` sees every
    newly trained arch.
    """
    sp = _space(space)
    settings = sp.settings if settings is None else settings
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetiaError(f"family file {str(path)!r}: expected a .safetensors file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    archs = sample_archs(sp, n, seed)
    header = family_header(sp, settings, seed)
    journal = journal_path(path)
    old_header, rows = _read_journal(journal)
    if old_header is not None and old_header != header:
        raise RetiaError(f"family journal {str(journal)!r} was written with {json.dumps(old_header, sort_keys=True)}, "
                         f"expected {json.dumps(header, sort_keys=True)}: use another output file")
    if old_header is None:
        journal.write_text("")
        _append(journal, {"header": header})
    done = {sp.key(r["arch"]): r for r in rows}
    graphs = [arch_graph(sp, r["arch"], r["name"], r["labels"]) for r in rows if sp.key(r["arch"]) in
              {sp.key(a) for a in archs}]
    todo = [(i, a) for i, a in enumerate(archs) if sp.key(a) not in done]
    meta = {"family": header, "metric": sp.metric}
    if graphs and not todo:
        _write_family(graphs, path, meta)
        return graphs
    if sp.make_init is not None:  # e.g. train the parent network (once; cached) before the bar starts
        if progress:
            print(f"{sp.name}: preparing the inherited weights (a parent network is trained once and cached)",
                  flush=True)
        sp.make_init(sp)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - len(todo), desc=f"{sp.name} family", unit="arch", file=sys.stdout)
    try:
        for i, arch in todo:
            model, labels = label_arch(sp, arch, dataclasses.replace(settings, seed=settings.seed + i))
            labels["train_seed"] = settings.seed + i
            name = f"{sp.name}-{i:03d}-{hashlib.sha1(sp.key(arch).encode()).hexdigest()[:8]}"
            graph = arch_graph(sp, arch, name, labels, model)
            _append(journal, {"name": name, "arch": arch, "labels": labels})
            graphs.append(graph)
            _write_family(graphs, path, meta)
            if on_arch is not None:
                on_arch(graph, model)
            if bar is not None:
                bar.set_postfix({sp.metric: f"{labels[sp.metric]:.3g}", "s": f"{labels['seconds']:.1f}"})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return graphs


def family_labels(graphs: Sequence[CompGraph], metric: str = "top1") -> np.ndarray:
    """The ``metric`` of every graph (from its meta) as floats."""
    missing = [g.name for g in graphs if metric not in g.meta]
    if missing:
        raise RetiaError(f"graph {missing[0]!r} has no label {metric!r} in its meta (expected a labelled family)")
    return np.array([float(g.meta[metric]) for g in graphs])


def _family_meta(path: Path) -> dict[str, Any]:
    from retia.weights import load_meta

    return (load_meta(path) or {}).get("meta") or {}


def family_metric(path: str | Path) -> str:
    """The label name of a family file: its meta's ``metric``; ``top1`` for files written before it was stored."""
    meta = _family_meta(Path(path))
    return meta.get("metric") or (meta.get("family") or {}).get("metric") or "top1"


def load_family(path: str | Path, metric: str | None = None) -> tuple[list[CompGraph], np.ndarray]:
    """``(graphs, labels)`` of a family file; ``metric`` default: the file's own (:func:`family_metric`)."""
    path = Path(path)
    if not path.is_file():
        raise RetiaError(f"family file {str(path)!r} does not exist")
    graphs = load_graphs(path)
    return graphs, family_labels(graphs, metric or family_metric(path))


# ---------------------------------------------------------------------------------------------------------------
# label noise ceiling
# ---------------------------------------------------------------------------------------------------------------
def noise_ceiling(path: str | Path, k: int = 16, seed_offset: int = 1000, progress: bool = True
                  ) -> dict[str, Any]:
    """Retrain the first ``k`` archs of the family file ``path`` with a second training seed (each arch's
    ``train_seed + seed_offset``; same data, settings and split) and compare the two label sets: ``{'srcc',
    'kendall', 'mae', 'ceiling', 'k', 'metric', 'seed_offset', 'names', 'first', 'second', 'seconds'}``.

    ``srcc`` (test-retest SRCC) is how well one training's labels rank the archs as another training does: a
    predictor scored against the stored labels cannot be expected to beat it by much. Read as a reliability (label =
    arch effect + independent seed noise), the best any predictor can expect against one label set is about its
    square root (Spearman's correction for attenuation), reported as ``ceiling`` (NaN when ``srcc`` <= 0).

    Retrained labels are kept in a journal (``<family>.noise-o<offset>.jsonl``), so a killed run resumes; the
    report is written to ``<family>.noise-o<offset>.json``. A family whose archs inherit weights (``hrnas-kp``)
    keeps its parent network: the second seed changes the fine-tuning only (as AIO-P's fixed supernet weights).
    """
    from .predictor import kendall_tau, spearman

    path = Path(path)
    graphs, labels = load_family(path)
    header = _family_meta(path).get("family")
    if not header or header.get("space") not in SPACES or "train" not in header:
        raise RetiaError(f"family file {str(path)!r} has no family header (expected a file of build_family)")
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= len(graphs):
        raise RetiaError(f"noise ceiling k={k!r}: expected an int in [2, {len(graphs)}] (the family's size)")
    if isinstance(seed_offset, bool) or not isinstance(seed_offset, int) or seed_offset == 0:
        raise RetiaError(f"noise ceiling seed offset {seed_offset!r}: expected a non-zero int")
    sp = get_space(header["space"])
    if header.get("data") is not None and header["data"] != sp.data_args:  # a family built with other data sizes
        sp = dataclasses.replace(sp, data_args=dict(header["data"]))
    if header.get("recipe") is not None and header["recipe"] != sp.recipe:  # e.g. another parent network
        sp = dataclasses.replace(sp, recipe=dict(header["recipe"]))
    settings = TrainSettings(**header["train"])
    metric = family_metric(path)
    stem = path.with_suffix("")
    journal = stem.with_name(f"{stem.name}.noise-o{seed_offset}.jsonl")
    jheader = {"family": header, "seed_offset": seed_offset}
    old, rows = _read_journal(journal)
    if old is not None and old != jheader:
        raise RetiaError(f"noise journal {str(journal)!r} belongs to another family or offset: remove it")
    if old is None:
        journal.write_text("")
        _append(journal, {"header": jheader})
    second = {r["name"]: r for r in rows}
    chosen = graphs[:k]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=k, initial=sum(g.name in second for g in chosen), desc=f"{sp.name} second seed",
                   unit="arch", file=sys.stdout)
    try:
        for i, g in enumerate(chosen):
            if g.name in second:
                continue
            seed = int(g.meta.get("train_seed", settings.seed + i)) + seed_offset
            _, again = label_arch(sp, g.meta["arch"], dataclasses.replace(settings, seed=seed))
            row = {"name": g.name, "train_seed": seed, "labels": again}
            _append(journal, row)
            second[g.name] = row
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    first = [float(g.meta[metric]) for g in chosen]
    again = [float(second[g.name]["labels"][metric]) for g in chosen]
    srcc = spearman(first, again)
    report = {"family": str(path), "space": sp.name, "metric": metric, "k": k, "seed_offset": seed_offset,
              "srcc": srcc, "kendall": kendall_tau(first, again),
              "ceiling": math.sqrt(srcc) if srcc > 0 else float("nan"),
              "mae": float(np.mean(np.abs(np.subtract(first, again)))),
              "names": [g.name for g in chosen], "first": first, "second": again,
              "seconds": round(time.perf_counter() - start, 1)}
    stem.with_name(f"{stem.name}.noise-o{seed_offset}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from retia.cli import add_threads_arg, positive_int

    p = argparse.ArgumentParser(prog="python -m retia.evaluators.aiop.family", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, choices=list(SPACES), help="the retia space to sample")
    p.add_argument("--n", type=positive_int, default=40, help="architectures (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs per arch (default: the space's recipe: "
                        + ", ".join(f"{sp.settings.epochs} for {name}" for name, sp in SPACES.items()) + ")")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the space's recipe")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the space's recipe)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the space's recipe")
    p.add_argument("--warmup", type=float, default=None,
                   help="fraction of the steps with linear warmup (default: the space's recipe)")
    p.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    p.add_argument("-o", "--output", required=True, help="family file (.safetensors; + .json, .labels.jsonl)")
    p.add_argument("--noise-ceiling", type=positive_int, default=None, metavar="K",
                   help="also retrain the first K archs with a second training seed and report the SRCC between the "
                        "two label sets (the label-noise ceiling)")
    p.add_argument("--noise-seed-offset", type=int, default=1000,
                   help="second training seed = first + this (default: %(default)s)")
    p.add_argument("--shared-head", action="store_true",
                   help="also label every arch with the shared-head shortcut (autoformer only) and report its "
                        "SRCC / Kendall tau against the trained labels")
    p.add_argument("--supernet-epochs", type=positive_int, default=20, help="shared head: supernet epochs")
    p.add_argument("--head-archs", type=positive_int, default=24, help="shared head: subnets it is trained on")
    p.add_argument("--no-progress", action="store_true")
    add_threads_arg(p)
    return p


def settings_from_args(space: str | FamilySpace, args: argparse.Namespace, seed: int = 0) -> TrainSettings:
    """The space's recipe with the command-line overrides (``epochs``, ``batch_size``, ``lr``, ``weight_decay``,
    ``warmup`` where not None) and ``seed``."""
    changes = {k: getattr(args, k, None) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup")}
    return dataclasses.replace(_space(space).settings, seed=seed, **{k: v for k, v in changes.items() if v is not None})


def main(argv: list[str] | None = None) -> list[CompGraph]:
    from retia.cli import quiet, set_threads

    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    settings = settings_from_args(args.space, args, seed=args.seed)
    if args.shared_head and args.space != "autoformer":
        raise RetiaError(f"--shared-head needs a supernet: expected --space autoformer, got {args.space!r}")
    if args.noise_ceiling is not None and not 2 <= args.noise_ceiling <= args.n:
        raise RetiaError(f"--noise-ceiling {args.noise_ceiling}: expected 2..{args.n} (--n)")
    graphs = build_family(args.space, args.n, args.output, settings, seed=args.seed, progress=not args.no_progress)
    metric = SPACES[args.space].metric
    labels = family_labels(graphs, metric)
    print(f"{len(graphs)} {args.space} archs in {args.output}: {metric} {labels.min():.3g}..{labels.max():.3g} "
          f"(mean {labels.mean():.3g}), {sum(g.meta['seconds'] for g in graphs):.0f} s of training")
    if args.noise_ceiling is not None:
        report = noise_ceiling(args.output, args.noise_ceiling, args.noise_seed_offset, progress=not args.no_progress)
        print(f"label-noise ceiling ({report['k']} archs retrained with seed +{report['seed_offset']}): test-retest "
              f"SRCC {report['srcc']:.3f}, Kendall tau {report['kendall']:.3f}, mean |difference| {report['mae']:.3g}; "
              f"predictor ceiling ~ sqrt(SRCC) = {report['ceiling']:.2f} ({report['seconds']:.0f} s)")
    if args.shared_head:
        from .shared_head import label_family_shared_head

        report = label_family_shared_head(args.output, supernet_epochs=args.supernet_epochs,
                                          head_archs=args.head_archs, seed=args.seed,
                                          progress=not args.no_progress)
        print(f"shared-head labels vs trained: SRCC {report['srcc']:.3f}, Kendall tau {report['kendall']:.3f} "
              f"(n={report['n']}, {report['seconds']:.0f} s)")
    return graphs


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
