"""Data: the embedded digits default and real datasets from local paths, as LightningDataModules."""
from __future__ import annotations

from .digits import DigitsDataModule, digits_tensors
from .folders import FolderDataModule, detect_layout
from .segmentation import (IGNORE_INDEX, SegmentationFolder, SegmentationFolderDataModule, SyntheticShapesDataModule,
                           build_segmentation_datamodule, detect_segmentation_layout, synthetic_shapes)


def build_datamodule(datapath: str | None = None, image_size: int = 32, batch_size: int = 64, num_workers: int = 0,
                     seed: int = 0, **kwargs):
    """The embedded digits when ``datapath`` is None, else the ImageFolder / CIFAR directory at ``datapath``."""
    if datapath is None:
        return DigitsDataModule(image_size=image_size, batch_size=batch_size, seed=seed, num_workers=num_workers)
    return FolderDataModule(datapath, image_size=image_size, batch_size=batch_size, num_workers=num_workers, **kwargs)


__all__ = ["DigitsDataModule", "FolderDataModule", "build_datamodule", "detect_layout", "digits_tensors",
           "IGNORE_INDEX", "SegmentationFolder", "SegmentationFolderDataModule", "SyntheticShapesDataModule",
           "build_segmentation_datamodule", "detect_segmentation_layout", "synthetic_shapes"]
