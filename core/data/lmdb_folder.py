"""ImageFolder splits packed into one LMDB file for fast reading: encoded image bytes and labels, no pickle.

    python -m retia.data.lmdb_folder pack SRC DST.lmdb [--split NAME] [--force]
    python -m retia.data.lmdb_folder info DST.lmdb

``SRC`` is an ImageFolder root (``train/`` and ``val/`` class folders: both splits go into ``DST.lmdb``) or one
split of class folders (stored under its folder name if that is ``train`` / ``val``, else ``val``, or ``--split``).
The file (LMDB with ``subdir=False``) holds:

* ``__retia__`` → JSON ``{"format": "retia-imagefolder-lmdb", "version": 1, "classes": [...], "splits": {split: n}}``;
* ``<split>/labels`` → the n labels as little-endian uint32;
* ``<split>/<index:010d>`` → ``struct "<IH"`` (label, name length), the UTF-8 path relative to the split, then the
  source file's bytes unchanged (so decoding gives exactly the pixels the ImageFolder gives).

Samples are stored in torchvision ImageFolder's order, so index i is the same sample in both.
:class:`LMDBImageFolder` reads one split. A process opens a file once (py-lmdb refuses a second open of the same
file in one process), read-only and without a lock file, on first use: every DataLoader worker and DDP rank has
its own; one inherited through ``fork`` is closed in the child and opened again, as LMDB requires.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import RetiaError, expect

FORMAT, VERSION = "retia-imagefolder-lmdb", 1
META_KEY = b"__retia__"
RECORD = struct.Struct("<IH")
SPLITS = ("train", "val")
TXN_RECORDS = 1000  # records per write transaction
_ENVS: dict[str, tuple[tuple[int, int], object]] = {}  # resolved path -> ((st_dev, st_ino), environment)
_ENVS_PID = os.getpid()


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise RetiaError("LMDB datasets need the lmdb package: expected it installed (pip install lmdb)") from None
    return lmdb


def _sample_key(split: str, index: int) -> bytes:
    return f"{split}/{index:010d}".encode()


def open_env(path: str | Path):
    """``path`` opened read-only without a lock file (safe for many readers); a one-line error if it is not an
    LMDB. Use :func:`shared_env`: a second open of one file in one process fails."""
    lmdb = _lmdb()
    try:
        return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as exc:
        reason = str(exc).splitlines()[0].replace(f"{path}: ", "")
        raise RetiaError(f"LMDB {str(path)!r}: not an LMDB file ({reason})") from None


def shared_env(path: str | Path):
    """This process's one read-only environment of the file at ``path`` (opened on first use; reopened when the
    file was replaced, or when this process is a fork of the one that opened it)."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for _, env in _ENVS.values():
            env.close()  # the parent's: closes this process's mapping only
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    p = Path(path).expanduser()
    expect(p.is_file(), f"LMDB {str(path)!r}: expected an LMDB file from `python -m retia.data.lmdb_folder pack`")
    key, st = str(p.resolve()), p.stat()
    ident = (st.st_dev, st.st_ino)
    if key in _ENVS and _ENVS[key][0] != ident:  # packed again (--force) since it was opened
        _ENVS.pop(key)[1].close()
    if key not in _ENVS:
        _ENVS[key] = (ident, open_env(p))
    return _ENVS[key][1]


def read_meta(path: str | Path) -> dict:
    """The ``__retia__`` metadata of a packed file (classes, sample count per split)."""
    with shared_env(path).begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise RetiaError(f"LMDB {str(path)!r}: no {META_KEY.decode()} key: expected a file written by "
                         "`python -m retia.data.lmdb_folder pack`")
    meta = json.loads(raw)
    expect(meta.get("format") == FORMAT and meta.get("version") == VERSION,
           f"LMDB {str(path)!r}: format {meta.get('format')!r} v{meta.get('version')}: expected {FORMAT!r} v{VERSION}")
    return meta


class LMDBImageFolder(Dataset):
    """One split of a packed file as a map-style dataset of ``(transform(PIL RGB image), label)``, like
    torchvision's ImageFolder (``classes``, ``class_to_idx``, ``targets``)."""

    def __init__(self, path: str | Path, split: str, transform=None, target_transform=None):
        self.path, self.split = Path(path), split
        self.transform, self.target_transform = transform, target_transform
        meta = read_meta(self.path)
        if split not in meta["splits"]:
            raise RetiaError(f"LMDB {str(path)!r}: no split {split!r}: expected one of {', '.join(meta['splits'])}")
        self.classes: list[str] = list(meta["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        with shared_env(self.path).begin() as txn:
            raw = txn.get(f"{split}/labels".encode())
        expect(raw is not None, f"LMDB {str(path)!r}: no {split}/labels key: expected a complete file")
        labels = np.frombuffer(raw, dtype="<u4")
        self.targets: list[int] = labels.astype(np.int64).tolist()
        expect(len(self.targets) == meta["splits"][split],
               f"LMDB {str(path)!r}: split {split!r} has {len(self.targets)} labels: expected {meta['splits'][split]}")
        self._env, self._pid = None, None  # this process's environment, looked up once per process

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self):  # a worker started by spawn looks its own environment up
        return dict(self.__dict__, _env=None, _pid=None)

    def _record(self, index: int) -> tuple[int, str, bytes]:
        if not 0 <= index < len(self.targets):
            raise IndexError(f"index {index} out of range for {len(self.targets)} samples")
        if self._pid != os.getpid():
            self._env, self._pid = shared_env(self.path), os.getpid()
        with self._env.begin() as txn:
            raw = txn.get(_sample_key(self.split, index))
        if raw is None:
            raise RetiaError(f"LMDB {str(self.path)!r}: sample {self.split}/{index} missing: expected a complete file")
        label, length = RECORD.unpack_from(raw)
        start = RECORD.size + length
        return label, raw[RECORD.size:start].decode(), raw[start:]

    def name(self, index: int) -> str:
        """The sample's path relative to its split folder when it was packed (``<class>/<file>``)."""
        return self._record(index)[1]

    def image(self, index: int):
        """The decoded image as PIL RGB (torchvision's ``pil_loader`` conversion)."""
        from PIL import Image

        return Image.open(io.BytesIO(self._record(index)[2])).convert("RGB")

    def __getitem__(self, index: int):
        from PIL import Image

        label, _, data = self._record(index)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


def _source_splits(src: Path, split: str | None) -> dict[str, Path]:
    from .folders import detect_layout

    layout, root = detect_layout(src)
    if layout == "imagefolder":
        expect(split is None, f"pack: --split {split!r} is for one split of class folders, but {str(src)!r} holds "
                              "train/ and val/")
        return {"train": root / "train", "val": root / "val"}
    expect(layout == "split", f"pack: {str(src)!r} is a {layout} folder: expected an ImageFolder (train/ and val/ "
                              "class folders, or one split of class folders)")
    name = split or (root.name if root.name in SPLITS else "val")
    expect(name.isidentifier(), f"pack: split {name!r}: expected a name of letters, digits and _")
    return {name: root}


def pack(src: str | Path, dst: str | Path, split: str | None = None, force: bool = False,
         progress: bool = True) -> dict:
    """Pack the ImageFolder split(s) at ``src`` into the LMDB file ``dst`` (see the module docstring); returns the
    metadata written. Writes ``dst`` under a temporary name and renames it when complete."""
    from torchvision import datasets
    from tqdm import tqdm

    lmdb = _lmdb()
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise RetiaError(f"pack: {str(dst)!r} exists: expected a new path (or --force)")
    expect(dst.parent.is_dir(), f"pack: folder {str(dst.parent)!r} does not exist: expected an existing folder")
    folders = {}
    for name, folder in _source_splits(Path(src).expanduser(), split).items():
        try:
            folders[name] = datasets.ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as exc:
            raise RetiaError(f"pack: {str(folder)!r}: not an ImageFolder split ({exc})") from None
    classes = next(iter(folders.values())).classes
    for name, ds in folders.items():
        expect(ds.classes == classes, f"pack: split {name!r} has classes {ds.classes[:5]}...: expected the same "
                                      f"class folders in every split ({classes[:5]}...)")
    total_bytes = sum(os.path.getsize(p) for ds in folders.values() for p, _ in ds.samples)
    count = sum(len(ds.samples) for ds in folders.values())
    tmp = dst.with_name(dst.name + ".partial")
    for leftover in (tmp, Path(f"{tmp}-lock")):
        leftover.unlink(missing_ok=True)
    env = lmdb.open(str(tmp), subdir=False, map_size=2 * total_bytes + 1024 * count + (64 << 20), meminit=False)
    bar = tqdm(total=count, desc=f"pack {dst.name}", unit="img", disable=not progress)
    try:
        for name, ds in folders.items():
            for start in range(0, len(ds.samples), TXN_RECORDS):
                with env.begin(write=True) as txn:
                    for i, (path, label) in enumerate(ds.samples[start:start + TXN_RECORDS], start):
                        rel = os.path.relpath(path, ds.root).replace(os.sep, "/").encode()
                        txn.put(_sample_key(name, i), RECORD.pack(label, len(rel)) + rel + Path(path).read_bytes())
                        bar.update()
            with env.begin(write=True) as txn:
                txn.put(f"{name}/labels".encode(), np.asarray(ds.targets, dtype="<u4").tobytes())
        meta = {"format": FORMAT, "version": VERSION, "classes": classes,
                "splits": {name: len(ds.samples) for name, ds in folders.items()}}
        with env.begin(write=True) as txn:
            txn.put(META_KEY, json.dumps(meta).encode())
        env.sync(True)
    finally:
        env.close()
        bar.close()
        Path(f"{tmp}-lock").unlink(missing_ok=True)
    os.replace(tmp, dst)
    return meta


def datamodule_sources(layout: str, root: Path) -> dict[str, tuple[Path, str]]:
    """``{"train": (file, split), "val": (file, split)}`` for a datamodule: an LMDB file with train and val (or one
    split, then used as validation), or a folder of ``train.lmdb`` / ``val.lmdb`` (each holding that split, or only
    one); every file must list the same classes."""
    if layout == "lmdb":
        splits = list(read_meta(root)["splits"])
        if len(splits) == 1:
            return {"val": (root, splits[0])}
        expect(set(SPLITS) <= set(splits), f"LMDB {str(root)!r}: splits {splits}: expected train and val, or one")
        return {s: (root, s) for s in SPLITS}
    sources, classes = {}, None
    for role in SPLITS:
        path = root / f"{role}.lmdb"
        if not path.exists():
            continue
        meta = read_meta(path)
        if role in meta["splits"]:
            sources[role] = (path, role)
        else:
            expect(len(meta["splits"]) == 1, f"LMDB {str(path)!r}: splits {list(meta['splits'])}: expected {role!r}")
            sources[role] = (path, next(iter(meta["splits"])))
        expect(classes is None or meta["classes"] == classes,
               f"LMDB {str(path)!r}: its classes differ from train.lmdb's: expected the same class list")
        classes = meta["classes"]
    expect("val" in sources, f"datapath {str(root)!r}: has train.lmdb but no val.lmdb: expected both, or val.lmdb")
    return sources


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retia.data.lmdb_folder", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack an ImageFolder (train/ + val/, or one split) into one LMDB file")
    pk.add_argument("src")
    pk.add_argument("dst")
    pk.add_argument("--split", default=None, help="split name for one split of class folders (default: its "
                                                   "folder name if train/val, else val)")
    pk.add_argument("--force", action="store_true", help="replace an existing DST")
    pk.add_argument("--no-progress", action="store_true")
    info = sub.add_parser("info", help="print a packed file's metadata")
    info.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.command == "pack":
        meta = pack(a.src, a.dst, a.split, a.force, not a.no_progress)
        counts = ", ".join(f"{n} {s}" for s, n in meta["splits"].items())
        print(f"packed {counts} images of {len(meta['classes'])} classes -> {a.dst}")
        return meta
    meta = read_meta(a.path)
    shown = dict(meta, classes=meta["classes"][:10] + (["..."] if len(meta["classes"]) > 10 else []))
    print(json.dumps(dict(shown, num_classes=len(meta["classes"]))))
    return meta


if __name__ == "__main__":
    from ..cli import run_main

    run_main(main)
