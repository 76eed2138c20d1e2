"""The training loader every in-memory retia DataModule uses."""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset


def train_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Shuffled batches of ``dataset``; the last, partial batch is dropped (BatchNorm sees no tiny batch) unless it
    would be the only one (a set smaller than a batch still trains)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      drop_last=len(dataset) > batch_size)
