"""Semantic-segmentation data: an embedded synthetic default and readers for Cityscapes / ADE20K on disk.

Every dataset yields ``(image, label)``: a normalised float image ``(3, H, W)`` and an int64 label map ``(H, W)``
with class ids ``0 .. num_classes-1`` and :data:`IGNORE_INDEX` (255) for pixels that count for nothing (neither
loss nor metric).

* :class:`SyntheticShapesDataModule` (default, offline, nothing on disk): circles, rectangles and triangles on
  textured noisy backgrounds, generated in memory from a seed; class 0 is the background, 1 circle,
  2 rectangle, 3 triangle. Shape colours are drawn around a per-class hue with large jitter and may overlap,
  so the model needs shape as well as colour.
* :class:`SegmentationFolderDataModule`: the real on-disk layouts (nothing is ever downloaded)

  - Cityscapes: ``root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` with
    ``root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``; label ids mapped to the standard 19 train ids
    (:data:`CITYSCAPES_TRAIN_IDS`), every other id → 255;
  - ADE20K (SceneParsing, ``ADEChallengeData2016``): ``root/images/{training,validation}/<name>.jpg`` with
    ``root/annotations/{training,validation}/<name>.png`` (``root`` may also be the folder holding
    ``ADEChallengeData2016``); 150 classes, label 0 ("other") → 255, label k → k − 1.

Training uses the usual segmentation augmentation (random rescale by ``scale_range``, random crop to
``crop_size`` padded with 255 in the label, horizontal flip); evaluation keeps the full image unless
``eval_size`` asks for a fixed resize (image bilinear, label nearest — then it is not the official protocol).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import RetiaError, expect
from .loaders import train_loader

IGNORE_INDEX = 255
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Cityscapes labelIds → trainIds (cityscapesScripts' labels.py): road, sidewalk, building, wall, fence, pole,
# traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
SHAPE_CLASSES = ("background", "circle", "rectangle", "triangle")

CITYSCAPES_LAYOUT = ("Cityscapes: leftImg8bit/{split}/<city>/*_leftImg8bit.png + "
                     "gtFine/{split}/<city>/*_gtFine_labelIds.png")
ADE20K_LAYOUT = ("ADE20K: [ADEChallengeData2016/]images/{training,validation}/*.jpg + "
                 "annotations/{training,validation}/*.png")


def cityscapes_lut() -> np.ndarray:
    """A 256-entry uint8 table: Cityscapes label id → train id (255 for ids that are not trained on)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def ade20k_lut(num_classes: int = 150) -> np.ndarray:
    """A 256-entry uint8 table: ADE20K label → class (0 "other" → 255, k → k − 1, above ``num_classes`` → 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[1:num_classes + 1] = np.arange(num_classes, dtype=np.uint8)
    return lut


# ---------------------------------------------------------------------------------------------------------------
# synthetic shapes
# ---------------------------------------------------------------------------------------------------------------
_BASE_COLOURS = np.array([[0.5, 0.5, 0.5], [0.9, 0.25, 0.2], [0.2, 0.75, 0.3], [0.25, 0.35, 0.9]], dtype=np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random background: a smooth colour gradient plus a few random sinusoidal gratings plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.2, 0.8, size=(3, 1, 1)).astype(np.float32)
    grad = rng.uniform(-0.3, 0.3, size=(3, 2, 1, 1)).astype(np.float32)
    img = base + grad[:, 0] * (yy - 0.5) + grad[:, 1] * (xx - 0.5)
    for _ in range(3):
        fy, fx = rng.uniform(-12, 12, size=2)
        phase, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.03, 0.12)
        img = img + amp * np.sin(2 * math.pi * (fy * yy + fx * xx) + phase)[None] * rng.uniform(0.3, 1, (3, 1, 1))
    return img.astype(np.float32)


def _shape_mask(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    r = rng.uniform(0.1, 0.25) * size
    if kind == 1:  # circle
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:  # axis-aligned rectangle, aspect up to 2:1
        hy, hx = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0)
        return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
    # triangle: three corners at random angles around the centre
    angles = rng.uniform(0, 2 * math.pi) + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.4, 0.4, 3)
    py, px = cy + r * 1.3 * np.sin(angles), cx + r * 1.3 * np.cos(angles)

    def side(i, j):
        return (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])

    s0, s1, s2 = side(0, 1), side(1, 2), side(2, 0)
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def synthetic_shapes(num_images: int, image_size: int = 64, seed: int = 0, max_shapes: int = 4,
                     noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` generated images ``(N, 3, S, S)`` (float, pixel values in [0, 1] normalised as
    ``(x - 0.5) / 0.25``: about mean 0, std 1) and label maps ``(N, S, S)`` (int64, :data:`SHAPE_CLASSES`).

    Each image: a textured background and 1..``max_shapes`` shapes (circle / rectangle / triangle, painted in
    order, later ones on top), colours jittered around a per-class hue, Gaussian pixel noise. Deterministic in
    ``seed``.
    """
    expect(isinstance(num_images, int) and num_images >= 1, f"num_images {num_images!r}: expected an int >= 1")
    expect(isinstance(image_size, int) and image_size >= 16, f"image_size {image_size!r}: expected an int >= 16")
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, 3, image_size, image_size), dtype=np.float32)
    labels = np.zeros((num_images, image_size, image_size), dtype=np.int64)
    for n in range(num_images):
        img, lab = _texture(rng, image_size), labels[n]
        for _ in range(rng.integers(1, max_shapes + 1)):
            kind = int(rng.integers(1, 4))
            mask = _shape_mask(rng, kind, image_size)
            colour = np.clip(_BASE_COLOURS[kind] + rng.uniform(-0.3, 0.3, 3), 0, 1).astype(np.float32)
            shade = 1 + 0.15 * rng.standard_normal((image_size, image_size)).astype(np.float32)
            img = np.where(mask[None], colour[:, None, None] * shade[None], img)
            lab[mask] = kind
        img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
        images[n] = (np.clip(img, 0, 1) - 0.5) / 0.25
    return torch.from_numpy(images), torch.from_numpy(labels)


class _FlipTensors(TensorDataset):
    """(image, label) tensors with a random horizontal flip of both when ``flip``."""

    def __init__(self, images, labels, flip: bool):
        super().__init__(images, labels)
        self.flip = flip

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        if self.flip and torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


class SyntheticShapesDataModule(pl.LightningDataModule):
    """The embedded default: :func:`synthetic_shapes` in memory, 4 classes, ``num_train`` / ``num_val`` images
    from disjoint seeds (train ``seed``, val ``seed + 1_000_003``), random flips for training."""

    num_classes = len(SHAPE_CLASSES)
    class_names = SHAPE_CLASSES
    ignore_index = IGNORE_INDEX

    def __init__(self, image_size: int = 64, num_train: int = 256, num_val: int = 64, batch_size: int = 16,
                 seed: int = 0, num_workers: int = 0, augment: bool = True):
        super().__init__()
        expect(isinstance(batch_size, int) and batch_size > 0, f"batch_size {batch_size!r}: expected a positive int")
        expect(isinstance(num_train, int) and num_train >= 1, f"num_train {num_train!r}: expected an int >= 1")
        expect(isinstance(num_val, int) and num_val >= 1, f"num_val {num_val!r}: expected an int >= 1")
        self.save_hyperparameters()
        self.image_size, self.num_train, self.num_val = image_size, num_train, num_val
        self.batch_size, self.seed, self.num_workers, self.augment = batch_size, seed, num_workers, augment
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        synthetic_shapes(1, self.image_size, self.seed)  # nothing to download: checks the arguments

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = _FlipTensors(*synthetic_shapes(self.num_train, self.image_size, self.seed), flip=self.augment)
        self.val_set = TensorDataset(*synthetic_shapes(self.num_val, self.image_size, self.seed + 1_000_003))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 64), num_workers=self.num_workers)


# ---------------------------------------------------------------------------------------------------------------
# real datasets on disk
# ---------------------------------------------------------------------------------------------------------------
def _pairs_cityscapes(root: Path, split: str) -> list[tuple[Path, Path]]:
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_dir.is_dir():
        raise RetiaError(f"Cityscapes split folder {str(img_dir)!r} does not exist; expected {CITYSCAPES_LAYOUT}")
    pairs = []
    for image in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        label = gt_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            raise RetiaError(f"Cityscapes label {str(label)!r} for {str(image)!r} does not exist; "
                             f"expected {CITYSCAPES_LAYOUT}")
        pairs.append((image, label))
    if not pairs:
        raise RetiaError(f"Cityscapes split folder {str(img_dir)!r} holds no <city>/*_leftImg8bit.png; "
                         f"expected {CITYSCAPES_LAYOUT}")
    return pairs


def _pairs_ade20k(root: Path, split: str) -> list[tuple[Path, Path]]:
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir():
        raise RetiaError(f"ADE20K split folder {str(img_dir)!r} does not exist; expected {ADE20K_LAYOUT}")
    pairs = []
    for image in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        label = ann_dir / f"{image.stem}.png"
        if not label.is_file():
            raise RetiaError(f"ADE20K label {str(label)!r} for {str(image)!r} does not exist; expected {ADE20K_LAYOUT}")
        pairs.append((image, label))
    if not pairs:
        raise RetiaError(f"ADE20K split folder {str(img_dir)!r} holds no images; expected {ADE20K_LAYOUT}")
    return pairs


# name → (split names for train / val, number of classes, label table, pair finder)
DATASETS = {
    "cityscapes": (("train", "val"), 19, cityscapes_lut, _pairs_cityscapes),
    "ade20k": (("training", "validation"), 150, ade20k_lut, _pairs_ade20k),
}


def detect_segmentation_layout(root: str | Path) -> tuple[str, Path]:
    """``('cityscapes' | 'ade20k', resolved_root)`` or a one-line :class:`RetiaError` naming the path."""
    path = Path(root).expanduser()
    if not path.exists():
        raise RetiaError(f"datapath {str(root)!r} does not exist")
    if not path.is_dir():
        raise RetiaError(f"datapath {str(root)!r} is not a directory")
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return "cityscapes", path
    for candidate in (path, path / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return "ade20k", candidate
    raise RetiaError(f"datapath {str(root)!r} is not a segmentation dataset; expected {CITYSCAPES_LAYOUT} or "
                     f"{ADE20K_LAYOUT}")


def _size2(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


class SegmentationTransform:
    """uint8 HxWx3 image + uint8 HxW label → normalised float ``(3, h, w)`` + int64 ``(h, w)``.

    ``train``: random rescale by a factor in ``scale_range`` (image bilinear, label nearest), random crop to
    ``crop_size`` (padded with 0 / 255 when smaller), random horizontal flip. Otherwise: resize to ``size``
    when given, else unchanged.
    """

    def __init__(self, train: bool, crop_size: int | Sequence[int] | None = None,
                 scale_range: tuple[float, float] = (0.5, 2.0), size: int | Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.train, self.crop, self.scale_range, self.size = train, _size2(crop_size), scale_range, _size2(size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    @staticmethod
    def _resize(image: torch.Tensor, label: torch.Tensor, hw: tuple[int, int]):
        image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=hw, mode="nearest")[0, 0].long()
        return image, label

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        lab = torch.from_numpy(np.ascontiguousarray(label)).long()
        if self.train:
            h, w = lab.shape
            s = float(np.random.uniform(*self.scale_range))
            img, lab = self._resize(img, lab, (max(1, round(h * s)), max(1, round(w * s))))
            if self.crop is not None:
                ch, cw = self.crop
                h, w = lab.shape
                ph, pw = max(0, ch - h), max(0, cw - w)
                if ph or pw:
                    img = F.pad(img, (0, pw, 0, ph), value=0.0)
                    lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
                h, w = lab.shape
                y0, x0 = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
                img, lab = img[:, y0:y0 + ch, x0:x0 + cw], lab[y0:y0 + ch, x0:x0 + cw]
            if np.random.rand() < 0.5:
                img, lab = img.flip(-1), lab.flip(-1)
        elif self.size is not None:
            img, lab = self._resize(img, lab, self.size)
        return (img - self.mean) / self.std, lab.contiguous()


class SegmentationFolder(Dataset):
    """One split of Cityscapes / ADE20K read from disk with PIL; labels mapped through the dataset's table."""

    def __init__(self, root: str | Path, split: str = "val", dataset: str | None = None, transform=None):
        if dataset is not None and dataset not in DATASETS:
            raise RetiaError(f"segmentation dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
        name, path = detect_segmentation_layout(root)
        if dataset is not None and dataset != name:
            raise RetiaError(f"datapath {str(root)!r} is {name}, not {dataset}")
        splits, self.num_classes, lut, find = DATASETS[name]
        split_name = {"train": splits[0], "val": splits[1]}.get(split, split)
        expect(split_name in splits, f"split {split!r}: expected train or val")
        self.name, self.root, self.split = name, path, split_name
        self.pairs = find(path, split_name)
        self.lut = lut()
        self.transform = transform or SegmentationTransform(train=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image (uint8 HxWx3) and the mapped label (uint8 HxW, class ids and 255)."""
        from PIL import Image

        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(label_path) as lb:
            if lb.mode not in ("L", "P", "I", "I;16"):
                raise RetiaError(f"label {str(label_path)!r} has mode {lb.mode}; expected a single-channel PNG")
            raw = np.asarray(lb)
        if raw.shape != image.shape[:2]:
            raise RetiaError(f"label {str(label_path)!r} is {raw.shape[1]}x{raw.shape[0]}, its image "
                             f"{image.shape[1]}x{image.shape[0]}")
        raw = raw.astype(np.int64)
        label = np.where((raw >= 0) & (raw < 256), self.lut[np.clip(raw, 0, 255)], IGNORE_INDEX).astype(np.uint8)
        return image, label

    def __getitem__(self, index: int):
        return self.transform(*self.read(index))


class SegmentationFolderDataModule(pl.LightningDataModule):
    """Cityscapes or ADE20K from ``datapath`` (detected from the layout, or named by ``dataset``).

    Training: random rescale in ``scale_range``, crop ``crop_size`` (int or [h, w]), flip. Validation: full-size
    images with batch size 1 unless ``eval_size`` resizes them (then ``batch_size``).
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, datapath: str | Path, dataset: str | None = None, crop_size: int | Sequence[int] = 512,
                 eval_size: int | Sequence[int] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        expect(isinstance(batch_size, int) and batch_size > 0, f"batch_size {batch_size!r}: expected a positive int")
        if dataset is not None and dataset not in DATASETS:
            raise RetiaError(f"segmentation dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
        name, root = detect_segmentation_layout(datapath)
        if dataset is not None and dataset != name:
            raise RetiaError(f"datapath {str(datapath)!r} is {name}, not {dataset}")
        self.save_hyperparameters()
        self.dataset, self.root = name, root
        self.num_classes = DATASETS[name][1]
        self.class_names = CITYSCAPES_CLASSES if name == "cityscapes" else None
        self.crop_size, self.eval_size, self.scale_range = crop_size, eval_size, tuple(scale_range)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        detect_segmentation_layout(self.root)  # nothing to download

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = SegmentationFolder(self.root, "val", self.dataset,
                                              SegmentationTransform(train=False, size=self.eval_size))
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = SegmentationFolder(self.root, "train", self.dataset,
                                                SegmentationTransform(True, self.crop_size, self.scale_range))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size if self.eval_size is not None else 1,
                          num_workers=self.num_workers)


def build_segmentation_datamodule(datapath: str | Path | None = None, image_size: int = 64, batch_size: int = 16,
                                  num_workers: int = 0, seed: int = 0, **kwargs) -> pl.LightningDataModule:
    """The synthetic shapes when ``datapath`` is None (``image_size``², ``kwargs``: num_train, num_val, augment),
    else Cityscapes / ADE20K at ``datapath`` (``image_size`` is the training crop; ``kwargs``: dataset,
    eval_size, scale_range)."""
    if datapath is None:
        return SyntheticShapesDataModule(image_size=image_size, batch_size=batch_size, seed=seed,
                                         num_workers=num_workers, **kwargs)
    return SegmentationFolderDataModule(datapath, crop_size=image_size, batch_size=batch_size,
                                        num_workers=num_workers, **kwargs)
