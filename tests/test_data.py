"""Embedded digits and local dataset layouts."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from retia.data import DigitsDataModule, FolderDataModule, build_datamodule, detect_layout, digits_tensors
from retia.data.digits import split_indices
from retia.errors import RetiaError


def test_digits_are_the_real_sklearn_digits_as_rgb():
    from sklearn.datasets import load_digits

    images, labels = digits_tensors(32)
    assert images.shape == (1797, 3, 32, 32) and labels.shape == (1797,)
    assert torch.equal(labels, torch.from_numpy(load_digits().target))
    assert torch.equal(images[:, 0], images[:, 2])  # grey replicated into RGB
    assert abs(images.mean().item()) < 0.05


def test_digits_split_is_fixed_disjoint_and_complete():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) == 1797 and len(a.val_set) == 359
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    train_idx, val_idx = split_indices(1797, 0.2, seed=0)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1797))
    images, _ = digits_tensors(32)
    assert torch.equal(a.val_set.tensors[0], images[val_idx])
    c = DigitsDataModule(seed=1)
    c.setup()
    assert not torch.equal(c.val_set.tensors[1], a.val_set.tensors[1])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.int64


def _image_folder(root, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_layout(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    dm = build_datamodule(str(root), image_size=32, batch_size=2)
    assert isinstance(dm, FolderDataModule) and dm.layout == "imagefolder" and dm.num_classes == 2
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    split = FolderDataModule(str(root / "val"), image_size=32, batch_size=2)
    assert split.layout == "split" and split.num_classes == 2
    with pytest.raises(RetiaError, match="one split only"):
        split.train_dataloader()


def test_cifar10_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    dm = build_datamodule(str(tmp_path), image_size=32, batch_size=4)
    assert dm.layout == "cifar10" and dm.num_classes == 10
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]


def test_cifar_reader_refuses_pickled_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": Payload(), "labels": [0]}, f)
    dm = build_datamodule(str(tmp_path), image_size=32, batch_size=4)
    with pytest.raises(RetiaError, match="builtins.print"):
        dm.setup()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "expected train/ and val/"),
])
def test_bad_datapaths_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(RetiaError, match=message) as info:
        detect_layout(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
