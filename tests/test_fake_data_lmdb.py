"""Fake ImageFolder data, LMDB packing (same samples as the folder), DDP on the CPU."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retia.data import FolderDataModule, build_datamodule
from retia.data import lmdb_folder
from retia.data.fake import class_names, class_style, fake_image, generate_fake_data
from retia.data.fake import main as fake_main
from retia.data.lmdb_folder import LMDBImageFolder, pack, read_meta
from retia.errors import RetiaError

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    generate_fake_data(root, classes=4, train_per_class=3, val_per_class=2, size=24, progress=False)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_fake_tree_counts_classes_and_pixels(fake_root):
    names = class_names(4)
    assert names == ["class_000", "class_001", "class_002", "class_003"]
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (fake_root / split).iterdir()) == names
        assert all(len(list((fake_root / split / c).glob("*.png"))) == n for c in names)
    dm = build_datamodule(str(fake_root), image_size=24, batch_size=4)
    dm.setup()
    assert isinstance(dm, FolderDataModule) and dm.layout == "imagefolder" and dm.num_classes == 4
    assert len(dm.train_set) == 12 and len(dm.val_set) == 8 and dm.train_set.classes == names
    assert dm.val_set.targets == [0, 0, 1, 1, 2, 2, 3, 3]
    # PNG is lossless: the file is exactly the generator's image for (seed 0, split val = 1, class 2, index 1)
    pixels = fake_image(class_style(2, 0), 24, np.random.default_rng([0, 1, 2, 1]))
    assert np.array_equal(np.asarray(Image.open(fake_root / "val" / "class_002" / "img_000001.png")), pixels)


def test_fake_data_is_deterministic_per_seed(fake_root, tmp_path):
    generate_fake_data(tmp_path / "same", classes=4, train_per_class=3, val_per_class=2, size=24, progress=False)
    generate_fake_data(tmp_path / "other", classes=4, train_per_class=3, val_per_class=2, size=24, seed=1,
                       progress=False)
    reference = _files(fake_root)
    assert _files(tmp_path / "same") == reference
    other = _files(tmp_path / "other")
    assert other.keys() == reference.keys() and all(other[k] != reference[k] for k in reference)


def test_fake_data_is_learnable_by_a_linear_probe(tmp_path):
    """Logistic regression on 4x4-pooled pixels (evaluation transforms, through build_datamodule) beats chance
    (10%) by far; trained on shuffled labels it does not."""
    from sklearn.linear_model import LogisticRegression

    generate_fake_data(tmp_path, classes=10, train_per_class=20, val_per_class=10, size=32, progress=False)

    def features(split):
        dm = build_datamodule(str(tmp_path / split), image_size=32, batch_size=1000)  # one split: eval transforms
        x, y = next(iter(dm.val_dataloader()))
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).numpy(), y.numpy()

    (xt, yt), (xv, yv) = features("train"), features("val")
    assert len(yt) == 200 and len(yv) == 100 and sorted(set(yv.tolist())) == list(range(10))
    accuracy = LogisticRegression(max_iter=2000).fit(xt, yt).score(xv, yv)
    shuffled = LogisticRegression(max_iter=2000).fit(xt, np.random.default_rng(0).permutation(yt)).score(xv, yv)
    assert accuracy >= 0.6 and shuffled <= 0.3, (accuracy, shuffled)


def test_fake_data_errors(tmp_path):
    cases = [({"classes": 0}, "classes 0: expected an integer >= 1"),
             ({"train_per_class": 0}, "train_per_class 0"), ({"size": 4}, "size 4: expected an integer >= 8"),
             ({"fmt": "gif"}, "format 'gif': expected one of png, jpg"), ({"seed": -1}, "seed -1")]
    for kwargs, message in cases:
        with pytest.raises(RetiaError, match=message):
            generate_fake_data(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()
    out = tmp_path / "out"
    generate_fake_data(out, classes=2, train_per_class=1, val_per_class=1, size=8, progress=False)
    with pytest.raises(RetiaError, match="is not empty: expected a new or empty folder"):
        fake_main(["--out", str(out), "--classes", "2", "--size", "8", "--no-progress"])
    info = fake_main(["--out", str(out), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
                      "--size", "8", "--format", "jpg", "--force", "--no-progress"])
    assert info == {"classes": ["class_000", "class_001"], "train": 4, "val": 2}
    assert len(list(out.rglob("*.jpg"))) == 6
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetiaError, match="exists and is not a directory"):
        generate_fake_data(tmp_path / "file", progress=False)


def _seeded(dataset, index, seed=0):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return dataset[index]


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_lmdb_gives_the_imagefolder_samples(tmp_path, fmt):
    src = tmp_path / "src"
    generate_fake_data(src, classes=3, train_per_class=4, val_per_class=2, size=20, fmt=fmt, progress=False)
    meta = lmdb_folder.main(["pack", str(src), str(tmp_path / "data.lmdb"), "--no-progress"])
    assert meta == {"format": "retia-imagefolder-lmdb", "version": 1, "classes": class_names(3),
                    "splits": {"train": 12, "val": 6}}
    assert read_meta(tmp_path / "data.lmdb") == meta and not list(tmp_path.glob("*-lock"))
    folder = build_datamodule(str(src), image_size=16, batch_size=4)
    packed = build_datamodule(str(tmp_path / "data.lmdb"), image_size=16, batch_size=4)
    folder.setup(), packed.setup()
    assert packed.layout == "lmdb" and packed.num_classes == folder.num_classes == 3
    for a, b in ((folder.train_set, packed.train_set), (folder.val_set, packed.val_set)):
        assert isinstance(b, LMDBImageFolder) and len(a) == len(b)
        assert a.classes == b.classes and a.class_to_idx == b.class_to_idx and a.targets == b.targets
        for i, (path, label) in enumerate(a.samples):
            assert b.name(i) == os.path.relpath(path, a.root)
            assert b._record(i)[2] == Path(path).read_bytes()  # the file's bytes, unchanged
            assert np.array_equal(np.asarray(b.image(i)), np.asarray(a.loader(path)))  # pixel-identical
    for i in range(len(folder.val_set)):
        (xa, ya), (xb, yb) = folder.val_set[i], packed.val_set[i]
        assert torch.equal(xa, xb) and ya == yb
    for i in (0, 5, 11):  # the random training transforms too, under the same seeds
        (xa, ya), (xb, yb) = _seeded(folder.train_set, i), _seeded(packed.train_set, i)
        assert torch.equal(xa, xb) and ya == yb
    xa, ya = next(iter(folder.val_dataloader()))
    xb, yb = next(iter(packed.val_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_lmdb_folder_of_split_files_and_single_split(fake_root, tmp_path):
    d = tmp_path / "packed"
    d.mkdir()
    assert pack(fake_root / "train", d / "train.lmdb", progress=False)["splits"] == {"train": 12}
    assert pack(fake_root / "val", d / "val.lmdb", progress=False)["splits"] == {"val": 8}
    dm = build_datamodule(str(d), image_size=16, batch_size=4)
    dm.setup()
    assert dm.layout == "lmdb-dir" and dm.num_classes == 4 and len(dm.train_set) == 12 and len(dm.val_set) == 8
    folder = build_datamodule(str(fake_root), image_size=16, batch_size=4)
    folder.setup()
    assert dm.train_set.targets == folder.train_set.targets and dm.val_set.targets == folder.val_set.targets
    assert torch.equal(dm.val_set[7][0], folder.val_set[7][0])
    # one split alone (any name) serves as validation, like a lone split folder
    pack(fake_root / "train", tmp_path / "only.lmdb", split="holdout", progress=False)
    single = build_datamodule(str(tmp_path / "only.lmdb"), image_size=16, batch_size=4)
    single.setup()
    assert single.train_set is None and len(single.val_set) == 12 and single.val_set.split == "holdout"
    with pytest.raises(RetiaError, match="one split only"):
        single.train_dataloader()


def test_lmdb_workers_and_repacking(fake_root, tmp_path):
    path = tmp_path / "data.lmdb"
    pack(fake_root, path, progress=False)
    dm = build_datamodule(str(path), image_size=16, batch_size=3)
    dm.setup()
    dm.val_set[0]  # the parent has the file open before the workers fork
    serial = list(DataLoader(dm.val_set, batch_size=3))
    workers = list(DataLoader(dm.val_set, batch_size=3, num_workers=2))
    assert len(serial) == len(workers) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, workers))
    # packing again over an open file: readers see the new file
    other = tmp_path / "other"
    generate_fake_data(other, classes=2, train_per_class=1, val_per_class=5, size=16, seed=3, progress=False)
    with pytest.raises(RetiaError, match="exists: expected a new path"):
        pack(other, path, progress=False)
    pack(other, path, force=True, progress=False)
    assert read_meta(path)["splits"] == {"train": 2, "val": 10}
    assert LMDBImageFolder(path, "val").targets == [0] * 5 + [1] * 5


def test_data_errors_are_one_line(fake_root, tmp_path):
    import lmdb

    png = fake_root / "val" / "class_000" / "img_000000.png"
    with pytest.raises(RetiaError, match=r"is not a directory, nor a packed LMDB file: .*not an LMDB file \(MDB_INV"):
        build_datamodule(str(png))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RetiaError, match="is not a directory") as info:
        build_datamodule(str(tmp_path / "file.txt"))
    assert str(tmp_path / "file.txt") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RetiaError, match=r"^LMDB .*: not an LMDB file \(MDB_INVALID: File is not an LMDB file\)$"):
        LMDBImageFolder(png, "val")
    foreign = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(foreign), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    with pytest.raises(RetiaError, match="no __retia__ key: expected a file written by"):
        build_datamodule(str(foreign))
    with pytest.raises(RetiaError, match="does not exist"):
        build_datamodule(str(tmp_path / "missing"))
    pack(fake_root, tmp_path / "p.lmdb", progress=False)
    with pytest.raises(RetiaError, match="no split 'test': expected one of train, val"):
        LMDBImageFolder(tmp_path / "p.lmdb", "test")
    with pytest.raises(RetiaError, match="--split 'val' is for one split"):
        pack(fake_root, tmp_path / "q.lmdb", split="val", progress=False)
    with pytest.raises(RetiaError, match="folder .* does not exist"):
        pack(fake_root, tmp_path / "nowhere" / "q.lmdb", progress=False)
    # a folder with train.lmdb but no val.lmdb
    (tmp_path / "half").mkdir()
    pack(fake_root / "train", tmp_path / "half" / "train.lmdb", progress=False)
    with pytest.raises(RetiaError, match="has train.lmdb but no val.lmdb"):
        build_datamodule(str(tmp_path / "half"))
    # an empty class folder, in the folder reader and in pack
    broken = tmp_path / "broken"
    generate_fake_data(broken, classes=2, train_per_class=1, val_per_class=1, size=8, progress=False)
    (broken / "val" / "class_001" / "img_000000.png").unlink()
    with pytest.raises(RetiaError, match=r"not an ImageFolder split \(.*class_001"):
        build_datamodule(str(broken)).setup()
    with pytest.raises(RetiaError, match=r"pack: .*val.: not an ImageFolder split \(.*class_001"):
        pack(broken, tmp_path / "b.lmdb", progress=False)
    # train/ and val/ with different class folders would give wrong labels
    (broken / "val" / "class_001").rmdir()
    with pytest.raises(RetiaError, match="expected the same class folders in both"):
        build_datamodule(str(broken)).setup()
    with pytest.raises(RetiaError, match="expected the same class folders in every split"):
        pack(broken, tmp_path / "c.lmdb", progress=False)


@pytest.mark.slow
def test_cli_entry_point(tmp_path):
    """``python -m retia.data.fake``: writes the tree; bad input is ``error: ...`` on one line and exit status 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "retia.data.fake", "--out", str(tmp_path / "d"), "--train-per-class", "2",
            "--val-per-class", "1", "--size", "8"]
    done = subprocess.run(base + ["--classes", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "wrote 4 train + 2 val images of 2 classes" in done.stdout, done.stderr
    assert len(list((tmp_path / "d").rglob("*.png"))) == 6
    bad = subprocess.run(base + ["--classes", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "error: fake data: classes 0: expected an integer >= 1"


@pytest.mark.slow
def test_ddp_on_cpu_two_processes_trains_a_frozen_subnet(tmp_path):
    """Lightning DDP (gloo, 2 CPU processes) training a frozen HR-NAS subnet from an LMDB file: each rank gets its
    half of the samples, the weights stay identical across ranks, and they changed."""
    src = tmp_path / "src"
    generate_fake_data(src, classes=10, train_per_class=8, val_per_class=2, size=32, progress=False)
    pack(src, tmp_path / "data.lmdb", progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_classification.py"), "--data", str(tmp_path / "data.lmdb"),
           "--out", str(tmp_path / "out"), "--devices", "2", "--epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["sampler"] == "DistributedSampler" and r["dataset"] == 80 for r in ranks)
    a, b = (set(r["indices"]) for r in ranks)
    assert len(a) == len(b) == 40 and not a & b and a | b == set(range(80))
    assert all(r["batches"] == 2 and len(r["losses"]) == 4 for r in ranks)  # 40 samples / batch 20, 2 epochs
    assert ranks[0]["final_sha"] == ranks[1]["final_sha"] != ranks[0]["initial_sha"] == ranks[1]["initial_sha"]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different data on each rank, same weights
    assert ranks[0]["val_top1"] == ranks[1]["val_top1"]
