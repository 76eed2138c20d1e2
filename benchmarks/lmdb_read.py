"""Read speed of an ImageFolder against the same data packed into LMDB (retia.data.lmdb_folder).

    python benchmarks/lmdb_read.py [--images 2000] [--size 64] [--classes 20] [--format png] [--batch-size 64]
                                   [--workers 0] [--repeats 3] [--dir DIR]

Generates fake data (``retia.data.fake``; all images in train/, plus one validation image per class), packs it,
then reads the training split once per repeat through a DataLoader (decode + ToTensor, no augmentation, no
shuffling) from each source, alternating, and prints images/s (best and median); ``bytes only`` reads the encoded
images without decoding them (the part that LMDB changes). The files were just written,
so both sources are read from the page cache: the figures compare per-image overhead (one open / stat / read per
file against one memory-mapped lookup), not disk seeks, where LMDB's single file gains more.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_pass(dataset, batch_size: int, workers: int) -> float:
    """Images per second for one pass over ``dataset``."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def bytes_pass(source) -> float:
    """Images per second reading the encoded bytes only: each file, or each LMDB record."""
    start = time.perf_counter()
    if hasattr(source, "samples"):
        for path, _ in source.samples:
            with open(path, "rb") as f:
                f.read()
    else:
        for i in range(len(source)):
            source._record(i)
    return len(source) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="training images (spread over the classes)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--format", default="png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    a = p.parse_args(argv)

    import torch
    from torchvision import datasets, transforms

    from retia.data.fake import generate_fake_data
    from retia.data.lmdb_folder import LMDBImageFolder, pack

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.dir or tmp)
        per_class = max(1, a.images // a.classes)
        t = time.perf_counter()
        generate_fake_data(work / "folder", a.classes, per_class, 1, a.size, a.format, seed=0, force=True)
        generated = time.perf_counter() - t
        t = time.perf_counter()
        pack(work / "folder", work / "data.lmdb", force=True)
        packed = time.perf_counter() - t
        to_tensor = transforms.ToTensor()
        sources = {"ImageFolder": datasets.ImageFolder(str(work / "folder" / "train"), transform=to_tensor),
                   "LMDB": LMDBImageFolder(work / "data.lmdb", "train", transform=to_tensor)}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        raw: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(a.repeats):
            for name, dataset in sources.items():
                rates[name].append(one_pass(dataset, a.batch_size, a.workers))
                raw[name].append(bytes_pass(dataset))
        folder_bytes = sum(f.stat().st_size for f in (work / "folder" / "train").rglob("*") if f.is_file())
        lmdb_bytes = (work / "data.lmdb").stat().st_size
    n = len(sources["LMDB"])
    print(f"{n} training images {a.size}x{a.size} {a.format}, batch {a.batch_size}, {a.workers} workers, "
          f"{a.repeats} passes each; generated in {generated:.1f} s, packed in {packed:.1f} s; "
          f"files {folder_bytes / 2**20:.1f} MiB, LMDB {lmdb_bytes / 2**20:.1f} MiB")
    summary = {}
    for name in sources:
        values, only = rates[name], raw[name]
        summary[name] = {"best": max(values), "median": statistics.median(values), "bytes_best": max(only)}
        print(f"{name:12s} {max(values):8.0f} images/s best, {statistics.median(values):8.0f} median; "
              f"bytes only {max(only):9.0f} images/s best")
    ratio = summary["LMDB"]["best"] / summary["ImageFolder"]["best"]
    ratio_bytes = summary["LMDB"]["bytes_best"] / summary["ImageFolder"]["bytes_best"]
    print(f"LMDB / ImageFolder: {ratio:.2f}x decoded, {ratio_bytes:.2f}x bytes only (best passes)")
    return summary


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
