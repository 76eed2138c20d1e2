"""Training ZenNets with Zen-NAS's recipe, as an NNI Lightning evaluator (our port of the original
``train_image_classification.py`` and ``ts_train_image_classification.py``).

The recipe (the defaults of the original scripts' command lines):

* SGD, momentum 0.9, Nesterov; weight decay on convolution and linear weights only (biases and BatchNorm are not
  decayed); BatchNorm momentum 0.01; the ZenNet's custom initialisation (``--weight_init custom``);
* learning rate ``lr_per_256 * total_batch / 256`` (0.1 per 256), linear warm-up then cosine to
  ``target_lr_per_256 * total_batch / 256`` (0.0), set before every step from the number of training images
  seen — exactly the original's ``LearningRateScheduler`` (:func:`zennas_lr`);
* label smoothing 0.1 (one-hot targets ``1 - 0.1 + 0.1/K`` / ``0.1/K``), mixup (``gamma ~ Beta(0.2, 0.2)``, one
  permutation per batch, applied to images and soft targets), soft-target cross-entropy;
* data: auto-augment (the CIFAR-10 / ImageNet AutoAugment policies) and random erasing (p 0.5) — see
  :func:`zennas_datamodule`;
* teacher–student distillation (``ts_train_image_classification.py``): the loss adds
  ``feature_weight * sum_stages smooth_l1(proj(student_stage), teacher_stage)`` (1x1-conv projections, optional
  BN / ReLU, teacher features bilinearly resized to the student's) and
  ``logit_weight * CE(student_logits, softmax(teacher_logits))`` (:func:`distillation_loss`). Stage features are
  taken where the downsampling ratio first reaches ``target_downsample_ratio``, then each doubling.

Lightning runs it on any number of devices and nodes (``devices``, ``num_nodes``, ``strategy='ddp'``; under SLURM
Lightning reads the allocation from the environment), replacing the original's apex / Horovod code. Weights are
written as safetensors with a JSON sidecar holding the structure string (``SafetensorsCheckpoint``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from nni.nas.evaluator.pytorch import Lightning, LightningModule
from torch import nn

from retia.errors import RetiaError
from retia.evaluators.classification import ReportTop1ToNNI, make_trainer

__all__ = ["ZenNetTrainingModule", "distillation_loss", "mixup", "smoothed_one_hot", "soft_cross_entropy",
           "stage_features", "weight_decay_groups", "zennas_datamodule", "zennas_lr", "zennas_training_evaluator",
           "TimmStageAdapter", "build_projections"]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the original's CIFAR normalisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- the recipe's pieces, as plain functions -----------------------------------------------------------------


def zennas_lr(instances: float, base_lr: float, target_lr: float, instances_per_epoch: float, epochs: float,
              warmup_epochs: float, mode: str = "cosine") -> float:
    """The original's learning rate after ``instances`` training images (the current batch included).

    ``warm = instances_per_epoch * warmup_epochs``, ``stop = instances_per_epoch * epochs``;
    ``n < warm``: ``(n + 1) / warm * base_lr``; else with ``r = (n - warm + 1) / (stop - warm)``:
    cosine ``base + (target - base) * (1 - cos(pi r)) / 2``, linear ``base + (target - base) * r``.
    """
    stop = instances_per_epoch * epochs
    warm = instances_per_epoch * warmup_epochs
    if not stop > warm:
        raise RetiaError(f"epochs ({epochs}) must exceed the warm-up epochs ({warmup_epochs})")
    if instances < warm:
        return (instances + 1) / warm * base_lr
    ratio = (instances - warm + 1) / (stop - warm)
    if mode == "cosine":
        factor = (1 - math.cos(math.pi * ratio)) / 2
    elif mode == "linear":
        factor = ratio
    else:
        raise RetiaError(f"unknown learning-rate mode {mode!r}: expected 'cosine' or 'linear'")
    return base_lr + (target_lr - base_lr) * factor


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, eps: float | None = None) -> torch.Tensor:
    """One-hot targets; with ``eps`` the true class gets ``1 - eps + eps/K`` and the others ``eps/K``."""
    y = F.one_hot(labels, num_classes).float()
    if eps is None:
        return y
    on, off = 1 - eps + eps / num_classes, eps / num_classes
    return y * (on - off) + off


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float = 0.2,
          rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gamma * batch + (1 - gamma) * batch[perm]`` for images and soft targets, ``gamma ~ Beta(alpha, alpha)``."""
    gamma = float((rng or np.random.default_rng()).beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], device=images.device)
    return (images * gamma + images[perm] * (1 - gamma), targets * gamma + targets[perm] * (1 - gamma))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-(target * log_softmax(logits)).sum(1).mean()``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def weight_decay_groups(*modules: nn.Module, weight_decay: float) -> list[dict]:
    """The original's ``split_weights``: conv and linear weights decay, every other parameter does not."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                (decay if isinstance(m, (nn.Conv2d, nn.Linear)) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def distillation_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                      projections: Sequence[nn.Module], student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature_loss, logit_loss)`` of the original's ``compute_ts_distill_loss``.

    ``feature_loss = sum_i smooth_l1(proj_i(s_i), t_i)`` with ``t_i`` clamped to ``[-clip, clip]`` (when given) and
    resized bilinearly to ``s_i``'s side when it differs; ``logit_loss = -(softmax(t) * log_softmax(s)).sum(1).mean()``.
    """
    feature_loss = student_logits.new_zeros(())
    for sf, tf, proj in zip(student_features, teacher_features, projections):
        if clip is not None:
            tf = torch.clamp(tf, -clip, clip)
        if tf.shape[2] != sf.shape[2]:
            tf = F.interpolate(tf, sf.shape[2], mode="bilinear")
        feature_loss = feature_loss + F.smooth_l1_loss(proj(sf), tf)
    logit_loss = soft_cross_entropy(student_logits, F.softmax(teacher_logits, dim=1))
    return feature_loss, logit_loss


# ---- teachers --------------------------------------------------------------------------------------------------


class TimmStageAdapter(nn.Module):
    """``extract_stage_features_and_logit`` for timm EfficientNet / MobileNet-style models (``conv_stem``, ``bn1``,
    ``blocks``, ``conv_head``, ``bn2``, ``global_pool``, ``classifier``), as the original's geffnet teacher does it:
    stage outputs where the ratio reaches the target (then each doubling); the head's pre-activation output
    replaces the last feature when it has the same ratio."""

    def __init__(self, model: nn.Module):
        super().__init__()
        needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
        missing = [n for n in needed if not hasattr(model, n)]
        if missing:
            raise RetiaError(f"teacher {type(model).__name__} has no {missing[0]}: expected a ZenNet or a timm "
                             f"EfficientNet/MobileNet-style model")
        self.model = model

    def forward(self, x):
        return self.model(x)

    def extract_stage_features_and_logit(self, x, target_downsample_ratio: int = 16):
        m, size, feats = self.model, x.shape[2], []
        x = m.bn1(m.conv_stem(x))  # timm's bn1 is BatchNormAct2d (BN + activation)
        for block in m.blocks:
            x = block(x)
            if round(size / x.shape[2]) == target_downsample_ratio:
                feats.append(x)
                target_downsample_ratio *= 2
        x = m.conv_head(x)
        bn = m.bn2
        pre = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                           bn.momentum or 0.0, bn.eps) if isinstance(bn, nn.BatchNorm2d) else bn(x)
        if feats and round(size / pre.shape[2]) == target_downsample_ratio // 2:
            feats[-1] = pre
        else:
            feats.append(pre)
        x = bn(x)
        x = m.global_pool(x).flatten(1)
        return feats, m.classifier(x)


def stage_features(model: nn.Module, x: torch.Tensor, target_downsample_ratio: int):
    fn = getattr(model, "extract_stage_features_and_logit", None)
    if not callable(fn):
        raise RetiaError(f"{type(model).__name__} cannot give stage features (no extract_stage_features_and_logit)")
    return fn(x, target_downsample_ratio=target_downsample_ratio)


def build_projections(student: nn.Module, teacher: nn.Module, student_size: int, teacher_size: int,
                      target_downsample_ratio: int, bn: bool = False, relu: bool = False) -> nn.ModuleList:
    """1x1-conv projections from each student stage to the teacher stage (+BN, +ReLU), initialised as the
    original (``N(0, 1) / sqrt(fan_in) * 1e-4``, zero bias, unit BN)."""
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    with torch.no_grad():
        tf, _ = stage_features(teacher, torch.zeros(1, 3, teacher_size, teacher_size), target_downsample_ratio)
        sf, _ = stage_features(student, torch.zeros(1, 3, student_size, student_size), target_downsample_ratio)
    student.train(was[0])
    teacher.train(was[1])
    if len(tf) != len(sf) or not sf:
        raise RetiaError(f"teacher and student give {len(tf)} and {len(sf)} stage features at downsampling ratio "
                         f"{target_downsample_ratio} and beyond: choose a target_downsample_ratio both networks reach")
    projections = nn.ModuleList()
    for t, s in zip(tf, sf):
        layers: list[nn.Module] = [nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)]
        if bn:
            layers.append(nn.BatchNorm2d(t.shape[1], eps=1e-3))
        if relu:
            layers.append(nn.ReLU())
        proj = nn.Sequential(*layers)
        with torch.no_grad():
            conv = proj[0]
            conv.weight.copy_(torch.randn_like(conv.weight) / math.sqrt(conv.in_channels) * 1e-4)
            conv.bias.zero_()
        projections.append(proj)
    return projections


# ---- the Lightning module ------------------------------------------------------------------------------------


class ZenNetTrainingModule(ReportTop1ToNNI, LightningModule):
    """Zen-NAS's training recipe (see the module docstring) for the model NNI sets (``set_model``).

    ``teacher``: an ``nn.Module`` with ``extract_stage_features_and_logit`` (a ZenNet, or a timm model wrapped in
    :class:`TimmStageAdapter`) enables distillation; it stays frozen in eval mode. ``init_weights``: a weights file
    loaded into the model when fitting starts.
    """

    def __init__(self, num_classes: int, lr_per_256: float = 0.1, target_lr_per_256: float = 0.0,
                 lr: float | None = None, target_lr: float | None = None, warmup_epochs: float = 5,
                 lr_mode: str = "cosine", momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4,
                 label_smoothing: bool = True, mixup: bool = True, mixup_alpha: float = 0.2,
                 bn_momentum: float | None = 0.01, weight_init: str = "custom", teacher: nn.Module | None = None,
                 teacher_image_size: int | None = None, student_image_size: int | None = None,
                 teacher_feature_weight: float = 1.0, teacher_logit_weight: float = 1.0,
                 target_downsample_ratio: int = 16, ts_proj_bn: bool = False, ts_proj_relu: bool = False,
                 ts_clip: float | None = None, seed: int = 0, init_weights: str | None = None,
                 report_to_nni: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        if weight_init not in ("custom", "none"):
            raise RetiaError(f"weight_init {weight_init!r}: expected 'custom' or 'none'")
        if lr_mode not in ("cosine", "linear"):
            raise RetiaError(f"lr_mode {lr_mode!r}: expected 'cosine' or 'linear'")
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.projections: nn.ModuleList | None = None
        self.top1 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1)
        self.top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes))
        self._rng = np.random.default_rng(seed)

    # -- model set-up --
    def set_model(self, model: nn.Module) -> None:
        super().set_model(model)
        hp = self.hparams
        if hp.weight_init == "custom":
            if not hasattr(model, "init_parameters"):
                raise RetiaError(f"weight_init 'custom' needs a model with init_parameters(), got {type(model).__name__}")
            model.init_parameters()
        if hp.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = hp.bn_momentum
        if self.teacher is not None:
            hp_s = hp.student_image_size or 32
            self.projections = build_projections(model, self.teacher, hp_s, hp.teacher_image_size or hp_s,
                                                 hp.target_downsample_ratio, hp.ts_proj_bn, hp.ts_proj_relu)

    def on_fit_start(self):
        # pretrained weights (official .pth or retia .safetensors) replace the custom initialisation; a classifier
        # for another number of classes keeps its fresh one
        path = self.hparams.init_weights
        if path:
            from retia.spaces import zennas

            try:
                zennas.load_official_weights(self.model, path)
            except RetiaError:
                zennas.load_official_weights(self.model, path, skip_head=True)

    def forward(self, x):
        return self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always runs in eval mode
        return self

    # -- learning rate: the original sets it before every step --
    def _batch_total(self) -> int:
        dm = self.trainer.datamodule if self.trainer is not None else None
        per_device = getattr(dm, "batch_size", None)
        if per_device is None:
            raise RetiaError("the datamodule must have a batch_size attribute")
        return int(per_device) * max(1, self.trainer.world_size)

    def _train_size(self) -> int:
        dm = self.trainer.datamodule
        dataset = getattr(dm, "train_set", None)
        if dataset is None:
            raise RetiaError("the datamodule must expose its training set as train_set")
        return len(dataset)

    def base_lrs(self) -> tuple[float, float]:
        hp, total = self.hparams, self._batch_total()
        base = hp.lr if hp.lr is not None else hp.lr_per_256 * total / 256.0
        target = hp.target_lr if hp.target_lr is not None else hp.target_lr_per_256 * total / 256.0
        return base, target

    def current_lr(self, epoch: int, batch_idx: int) -> float:
        hp = self.hparams
        base, target = self.base_lrs()
        n = epoch * self._train_size() + (batch_idx + 1) * self._batch_total()
        return zennas_lr(n, base, target, self._train_size(), self.trainer.max_epochs, hp.warmup_epochs, hp.lr_mode)

    def on_train_batch_start(self, batch, batch_idx):
        lr = self.current_lr(self.current_epoch, batch_idx)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr

    def configure_optimizers(self):
        hp = self.hparams
        modules = [self.model] + ([self.projections] if self.projections is not None else [])
        groups = weight_decay_groups(*modules, weight_decay=hp.weight_decay)
        return torch.optim.SGD(groups, lr=self.base_lrs()[0], momentum=hp.momentum, nesterov=hp.nesterov,
                               weight_decay=hp.weight_decay)

    # -- steps --
    def _targets(self, x, y):
        hp = self.hparams
        if not (hp.label_smoothing or hp.mixup):
            return x, None
        with torch.no_grad():
            target = smoothed_one_hot(y, hp.num_classes, 0.1 if hp.label_smoothing else None)
            if hp.mixup:
                x, target = mixup(x, target, hp.mixup_alpha, self._rng)
        return x, target

    def training_step(self, batch, batch_idx):
        x, y = batch
        x, target = self._targets(x, y)
        hp = self.hparams
        size = hp.student_image_size or x.shape[2]
        student_x = x if x.shape[2] == size else F.interpolate(x, size, mode="bilinear")
        if self.teacher is None:
            logits = self.model(student_x)
            feature_loss = logit_loss = None
        else:
            tsize = hp.teacher_image_size or size
            teacher_x = x if x.shape[2] == tsize else F.interpolate(x, tsize, mode="bilinear")
            with torch.no_grad():
                tf, tl = stage_features(self.teacher, teacher_x, hp.target_downsample_ratio)
            sf, logits = stage_features(self.model, student_x, hp.target_downsample_ratio)
            feature_loss, logit_loss = distillation_loss(sf, tf, self.projections, logits, tl, hp.ts_clip)
        loss = F.cross_entropy(logits, y) if target is None else soft_cross_entropy(logits, target)
        self.log("train_ce", loss, on_epoch=True)
        if feature_loss is not None:
            loss = loss + hp.teacher_feature_weight * feature_loss + hp.teacher_logit_weight * logit_loss
            self.log("ts_feature_loss", feature_loss, on_epoch=True)
            self.log("ts_logit_loss", logit_loss, on_epoch=True)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        size = self.hparams.student_image_size or x.shape[2]
        if x.shape[2] != size:
            x = F.interpolate(x, size, mode="bilinear")
        logits = self.model(x)
        self.top1(logits, y)
        self.top5(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_top1", self.top1, prog_bar=True)
        self.log("val_top5", self.top5)



# ---- data -------------------------------------------------------------------------------------------------------


class _Lighting:
    """AlexNet-style PCA lighting noise (the original's ImageNet training transform, alpha std 0.1)."""

    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd: float = 0.1):
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * alpha.view(1, 3) * self.eigval.view(1, 3)).sum(1)
        return img + rgb.view(3, 1, 1)


def _train_transform(kind: str, image_size: int, auto_augment: bool, random_erase: bool):
    from torchvision import transforms as T

    if kind == "cifar":
        steps: list = []
        if image_size > 32:
            steps += [T.Resize(round(image_size / 0.75), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomResizedCrop(image_size, scale=(0.8, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
        else:
            steps += [T.RandomCrop(image_size, padding=4)]
        steps.append(T.RandomHorizontalFlip())
        if auto_augment:
            steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=[128, 128, 128]))
        steps += [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    else:
        steps = [T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, fill=[128, 128, 128]) if auto_augment
                     else T.ColorJitter(0.4, 0.4, 0.4))
        steps += [T.ToTensor(), _Lighting(0.1), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erase:
        steps.append(T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0))
    return T.Compose(steps)


def _eval_transform(kind: str, image_size: int):
    from torchvision import transforms as T

    if kind == "cifar":
        steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC)] if image_size > 32 else []
        return T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    return T.Compose([T.Resize(int(math.ceil(image_size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _DigitsAugment:
    """For the embedded digits (already normalised float tensors): AutoAugment (CIFAR-10 policy) on the de-normalised
    uint8 image, then random erasing. The digits' own random shift stays."""

    def __init__(self, shift, auto_augment: bool, random_erase: bool):
        from torchvision import transforms as T

        from retia.data.digits import DIGITS_MEAN, DIGITS_STD

        self.shift, self.mean, self.std = shift, DIGITS_MEAN, DIGITS_STD
        self.auto = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10) if auto_augment else None
        self.erase = T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0) if random_erase else None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            img = self.shift(img)
        if self.auto is not None:
            u8 = ((img * self.std + self.mean).clamp(0, 1) * 255).round().to(torch.uint8)
            img = (self.auto(u8).float() / 255 - self.mean) / self.std
        if self.erase is not None:
            img = self.erase(img)
        return img


def zennas_datamodule(datapath: str | None = None, image_size: int = 32, batch_size: int = 64,
                      num_workers: int = 0, seed: int = 0, auto_augment: bool = True,
                      random_erase: bool = True) -> pl.LightningDataModule:
    """The data of the recipe: the embedded digits (``datapath=None``), CIFAR-10/100 or an ImageFolder tree, with
    the original's training transforms (auto-augment, random erasing; CIFAR: padded crop + flip; ImageNet:
    random-resized crop, flip, PCA lighting) and evaluation transforms."""
    from retia.data import DigitsDataModule, FolderDataModule

    if datapath is None:
        class _Digits(DigitsDataModule):
            def setup(self, stage=None):
                if self.train_set is not None:
                    return
                super().setup(stage)
                self.train_set.transform = _DigitsAugment(self.train_set.transform, auto_augment, random_erase)

        return _Digits(image_size=image_size, batch_size=batch_size, seed=seed, num_workers=num_workers)

    class _Folder(FolderDataModule):
        def _cifar(self, train):
            from retia.data.cifar import CIFAR

            transform = (_train_transform("cifar", self.image_size, auto_augment, random_erase) if train
                         else _eval_transform("cifar", self.image_size))
            return CIFAR(self.root, self.layout, train=train, transform=transform)

        def _folder(self, split, train):
            from torchvision import datasets

            transform = (_train_transform("imagenet", self.image_size, auto_augment, random_erase) if train
                         else _eval_transform("imagenet", self.image_size))
            try:
                return datasets.ImageFolder(str(split), transform=transform)
            except (FileNotFoundError, RuntimeError) as exc:
                raise RetiaError(f"datapath {str(split)!r}: not an ImageFolder split ({exc})") from None

    return _Folder(datapath, image_size=image_size, batch_size=batch_size, num_workers=num_workers)


# ---- the evaluator ------------------------------------------------------------------------------------------------


def zennas_training_evaluator(datamodule: pl.LightningDataModule, num_classes: int, max_epochs: int,
                              log_dir: str | Path, callbacks: list[pl.Callback] | None = None,
                              accelerator: str = "auto", devices: int | str = "auto", num_nodes: int = 1,
                              strategy: str = "auto", precision: str | None = None, sync_batchnorm: bool = False,
                              limit_train_batches: float | int | None = None,
                              limit_val_batches: float | int | None = None, enable_progress_bar: bool = True,
                              **module_kwargs: Any) -> Lightning:
    """An NNI ``Lightning`` evaluator training :class:`ZenNetTrainingModule` on ``datamodule``.

    Multi-GPU / multi-node: ``devices=8, strategy='ddp'`` on one machine; ``num_nodes=N`` across machines (launch
    one process per node with ``torchrun`` or under SLURM with ``srun``: Lightning reads the ranks from the
    environment). ``sync_batchnorm`` synchronises BatchNorm statistics across devices.
    """
    trainer = make_trainer(max_epochs, log_dir, callbacks, accelerator=accelerator, devices=devices,
                           strategy=strategy, precision=precision, limit_train_batches=limit_train_batches,
                           limit_val_batches=limit_val_batches, enable_progress_bar=enable_progress_bar,
                           num_nodes=num_nodes, sync_batchnorm=sync_batchnorm)
    module = ZenNetTrainingModule(num_classes=num_classes, **module_kwargs)
    return Lightning(module, trainer, datamodule=datamodule)
