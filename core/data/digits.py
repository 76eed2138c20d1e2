"""The embedded default dataset: scikit-learn's real handwritten digits as small RGB images.

It ships inside scikit-learn (1797 8x8 grey images, 10 classes), so every retia job runs offline.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..errors import expect
from .loaders import train_loader

# Mean and std of the 8x8 digits scaled to [0, 1]; used to centre the images (same for the three channels).
DIGITS_MEAN = 0.3074
DIGITS_STD = 0.3856


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as normalised float RGB images ``(N, 3, image_size, image_size)`` and int64 labels."""
    from sklearn.datasets import load_digits

    expect(isinstance(image_size, int) and image_size >= 8, f"image_size {image_size!r}: expected an int >= 8")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target.astype(np.int64))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded train/val split of ``range(n)``."""
    expect(0.0 < val_fraction < 1.0, f"val_fraction {val_fraction!r}: expected a number in (0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


class RandomShift(torch.nn.Module):
    """Train-time augmentation for tensor batches: random translation by up to ``pixels`` (zero padding)."""

    def __init__(self, pixels: int = 2):
        super().__init__()
        self.pixels = pixels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pixels == 0:
            return image
        padded = F.pad(image, [self.pixels] * 4)
        dx, dy = torch.randint(0, 2 * self.pixels + 1, (2,)).tolist()
        return padded[..., dy:dy + image.shape[-2], dx:dx + image.shape[-1]]


class _AugmentedTensors(TensorDataset):
    def __init__(self, images, labels, transform=None):
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return (self.transform(image) if self.transform else image), label


class DigitsDataModule(pl.LightningDataModule):
    """sklearn digits as ``image_size``² RGB images, 10 classes, a fixed seeded train/val split."""

    num_classes = 10

    def __init__(self, image_size: int = 32, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0,
                 num_workers: int = 0, augment: bool = True):
        super().__init__()
        expect(isinstance(batch_size, int) and batch_size > 0, f"batch_size {batch_size!r}: expected a positive int")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.seed, self.augment = val_fraction, seed, augment
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        digits_tensors(8)  # nothing to download: checks scikit-learn ships the data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = digits_tensors(self.image_size)
        train_idx, val_idx = split_indices(len(labels), self.val_fraction, self.seed)
        shift = RandomShift(max(1, self.image_size // 16)) if self.augment else None
        self.train_set = _AugmentedTensors(images[train_idx], labels[train_idx], shift)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return train_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), num_workers=self.num_workers)
