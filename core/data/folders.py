"""Real datasets from local paths in their usual on-disk layouts (nothing is ever downloaded).

* ImageFolder / ImageNet style: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; a root that is
  itself one split (``<class>/*.jpg``) serves as the validation set (evaluation and search need no train set).
* CIFAR-10 / CIFAR-100 in torchvision's format: ``root/cifar-10-batches-py`` or ``root/cifar-100-python``
  (``root`` may also be that folder itself).
* An ImageFolder packed into LMDB by ``python -m retia.data.lmdb_folder pack``: the ``.lmdb`` file itself, or a
  folder holding ``train.lmdb`` and ``val.lmdb`` (see :mod:`retia.data.lmdb_folder`); same samples, same order.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ..errors import RetiaError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".JPEG"}
CIFAR_FOLDERS = {"cifar-10-batches-py": ("cifar10", 10), "cifar-100-python": ("cifar100", 100)}


def imagenet_transforms(image_size: int, train: bool, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                        reprob: float = 0.25):
    """The standard ImageNet training / evaluation transforms (timm's: random-resized-crop, flip, RandAugment,
    random erasing; resize + center crop at evaluation)."""
    from timm.data import create_transform

    if train:
        return create_transform(image_size, is_training=True, auto_augment=auto_augment, re_prob=reprob,
                                interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def cifar_transforms(image_size: int, train: bool):
    """The standard CIFAR transforms: 4-pixel padded random crop and horizontal flip for training."""
    from torchvision import transforms as T

    steps = [T.Resize(image_size)] if image_size != 32 else []
    if train:
        steps += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def _is_class_folder_split(path: Path) -> bool:
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    return bool(subdirs) and any(f.suffix in IMAGE_SUFFIXES for d in subdirs[:5] for f in d.iterdir())


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """``('imagefolder' | 'split' | 'cifar10' | 'cifar100' | 'lmdb' | 'lmdb-dir', resolved_root)`` or a one-line
    error naming the path."""
    path = Path(root).expanduser()
    if not path.exists():
        raise RetiaError(f"datapath {str(root)!r} does not exist")
    if path.is_file():
        from .lmdb_folder import read_meta

        try:
            read_meta(path)
        except RetiaError as exc:
            raise RetiaError(f"datapath {str(root)!r} is not a directory, nor a packed LMDB file: {exc}") from None
        return "lmdb", path
    if not path.is_dir():
        raise RetiaError(f"datapath {str(root)!r} is not a directory or an LMDB file")
    for folder, (name, _) in CIFAR_FOLDERS.items():
        if path.name == folder:
            return name, path.parent
        if (path / folder).is_dir():
            return name, path
    if (path / "train").is_dir() and (path / "val").is_dir():
        return "imagefolder", path
    if (path / "train.lmdb").is_file() or (path / "val.lmdb").is_file():
        return "lmdb-dir", path
    if _is_class_folder_split(path):
        return "split", path
    raise RetiaError(f"datapath {str(root)!r}: expected train/ and val/ class folders, one split of class folders, "
                     f"CIFAR's cifar-10-batches-py / cifar-100-python, or train.lmdb / val.lmdb")


class FolderDataModule(pl.LightningDataModule):
    """A LightningDataModule over a local ImageFolder or CIFAR directory (see the module docstring)."""

    def __init__(self, datapath: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25):
        super().__init__()
        self.save_hyperparameters()
        self.layout, self.root = detect_layout(datapath)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.auto_augment, self.reprob = auto_augment, reprob
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.lmdb_sources: dict[str, tuple[Path, str]] = {}
        if self.layout in ("lmdb", "lmdb-dir"):
            from .lmdb_folder import datamodule_sources

            self.lmdb_sources = datamodule_sources(self.layout, self.root)
        self.num_classes = self._count_classes()

    def _count_classes(self) -> int:
        if self.layout in ("cifar10", "cifar100"):
            return 10 if self.layout == "cifar10" else 100
        if self.lmdb_sources:
            from .lmdb_folder import read_meta

            return len(read_meta(self.lmdb_sources["val"][0])["classes"])
        split = self.root / "val" if self.layout == "imagefolder" else self.root
        return sum(1 for p in split.iterdir() if p.is_dir())

    def _cifar(self, train: bool):
        from .cifar import CIFAR

        return CIFAR(self.root, self.layout, train=train, transform=cifar_transforms(self.image_size, train))

    def _folder(self, split: Path, train: bool):
        from torchvision import datasets

        transform = imagenet_transforms(self.image_size, train, self.auto_augment, self.reprob)
        try:
            return datasets.ImageFolder(str(split), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise RetiaError(f"datapath {str(split)!r}: not an ImageFolder split ({exc})") from None

    def _lmdb(self, role: str):
        from .lmdb_folder import LMDBImageFolder

        path, split = self.lmdb_sources[role]
        transform = imagenet_transforms(self.image_size, role == "train", self.auto_augment, self.reprob)
        return LMDBImageFolder(path, split, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        if self.layout in ("cifar10", "cifar100"):
            self.train_set, self.val_set = self._cifar(True), self._cifar(False)
        elif self.lmdb_sources:
            self.train_set = self._lmdb("train") if "train" in self.lmdb_sources else None
            self.val_set = self._lmdb("val")
        elif self.layout == "imagefolder":
            self.train_set = self._folder(self.root / "train", True)
            self.val_set = self._folder(self.root / "val", False)
            if self.train_set.classes != self.val_set.classes:
                raise RetiaError(f"datapath {str(self.root)!r}: train/ has {len(self.train_set.classes)} class "
                                 f"folders, val/ {len(self.val_set.classes)} or other names: expected the same "
                                 "class folders in both (labels are their sorted order)")
        else:
            self.val_set = self._folder(self.root, False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.train_set is None:
            raise RetiaError(f"datapath {str(self.root)!r} holds one split only: training needs train/ and val/")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
