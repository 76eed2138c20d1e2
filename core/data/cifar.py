"""CIFAR-10 / CIFAR-100 from torchvision's on-disk layout, read without unpickling arbitrary objects.

CIFAR's python batches are pickles; this reader's unpickler admits only numpy arrays and plain containers, so
a tampered file cannot run code. Files are checked for presence (not md5), so re-packed copies work too.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import RetiaError

FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One CIFAR batch file as a dict with str keys (numpy arrays and lists only)."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise RetiaError(f"CIFAR file {str(path)!r} is missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise RetiaError(f"CIFAR file {str(path)!r} is not a CIFAR batch ({exc})") from None
    if not isinstance(batch, dict):
        raise RetiaError(f"CIFAR file {str(path)!r} is not a CIFAR batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


class CIFAR(Dataset):
    """CIFAR-10/100 images (PIL) and labels from ``root/cifar-10-batches-py`` or ``root/cifar-100-python``."""

    def __init__(self, root: str | Path, name: str = "cifar10", train: bool = True, transform=None):
        folder, train_files, test_files, label_key = FILES[name]
        data, labels = [], []
        for file in train_files if train else test_files:
            batch = read_batch(Path(root) / folder / file)
            if "data" not in batch or label_key not in batch:
                raise RetiaError(f"CIFAR file {str(Path(root) / folder / file)!r} lacks 'data' / {label_key!r}")
            data.append(np.asarray(batch["data"], dtype=np.uint8))
            labels += list(batch[label_key])
        self.images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])
