"""Labelled architecture families (AIO-P's ground truth): sample N archs of a retia space, train each briefly on
the embedded digits and store arch, graph, validation top-1, FLOPs and params in one graph file.

AIO-P's test families are individually trained architectures (``run_train_cgs_on_task.py``); here they are
trained on scikit-learn's digits so that a family of ~40 tiny nets takes minutes on one CPU thread:

- ``autoformer``: subnets of the AutoFormer ``micro`` preset (32² input, 8×8 patches), uniformly sampled labels;
- ``zennas``: Zen-NAS ``XXBL`` networks from ``random_structure`` with every width halved (8..64 channels) and a
  16² input (the 8×8 digits upsampled), so a net trains in seconds.

Training reuses :func:`retia.evaluators.classification.warmup_cosine` (AdamW, no decay on biases / norms / tokens,
linear warmup then cosine per step) on in-memory tensors of the fixed digits split of
:class:`retia.data.DigitsDataModule`; the label is top-1 in % on its 359 validation digits
(:func:`retia.evaluators.weight_sharing.accuracy`). Everything is seeded, so a label can be reproduced.

Files: ``family.safetensors`` + ``family.json`` (:func:`retia.evaluators.aiop.save_graphs`; each graph's ``meta``
holds ``space``, ``arch``, ``top1``, ``top5``, ``seconds``) and ``family.labels.jsonl``, a journal appended and
flushed after every arch. The journal is the source of truth: a killed run keeps every finished arch, and the
same command continues where it stopped (graphs are rebuilt from the journal's archs, labels are not re-trained).

Command::

    python -m retia.evaluators.aiop.family --space autoformer --n 40 --epochs 3 -o family.safetensors
    python -m retia.evaluators.aiop.family --space autoformer --n 40 -o family.safetensors --shared-head
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from retia.errors import RetiaError

from .graph import CompGraph, build_graph, load_graphs, save_graphs

__all__ = ["SPACES", "TrainSettings", "FamilySpace", "get_space", "sample_archs", "digits_split", "train_model",
           "label_arch", "arch_graph", "build_family", "load_family", "family_labels", "journal_path", "main"]

FAMILY_FORMAT = "retia.aiop.family/1"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------------------------
# spaces
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpace:
    """How a family samples, builds and names its archs (a dict for AutoFormer, a string for Zen-NAS)."""

    name: str
    resolution: int
    sample: Callable[[random.Random], Any]
    build: Callable[[Any], nn.Module]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.resolution, self.resolution)

    @staticmethod
    def key(arch: Any) -> str:
        return json.dumps(arch, sort_keys=True)


@functools.lru_cache(maxsize=1)
def _autoformer_space():
    from retia.spaces.autoformer import AutoformerSpace

    config = AutoformerSpace.config("micro")
    return config, AutoformerSpace.from_config(config)


def _autoformer_sample(rng: random.Random) -> dict[str, Any]:
    _, space = _autoformer_space()
    labels = space.simplify()
    return space.complete_arch({k: rng.choice(list(m.values)) for k, m in sorted(labels.items())})


def _autoformer_build(arch: dict[str, Any]) -> nn.Module:
    from retia.spaces.autoformer import AutoformerSpace

    config, _ = _autoformer_space()
    return AutoformerSpace.build_subnet(arch, config)


def shrink_structure(structure: str, scale: float = 0.5) -> str:
    """A Zen-NAS structure with every output / bottleneck width times ``scale`` (multiples of 8, at least 8)."""
    from retia.spaces import zennas

    specs = []
    for b in zennas.parse(structure):
        changes = {f: max(8, int(round(getattr(b, f) * scale / 8)) * 8)
                   for f in ("out_channels", "bottleneck_channels") if hasattr(b, f)}
        specs.append(dataclasses.replace(b, **changes))
    return zennas.fix_channels(specs)


def _zennas_sample(rng: random.Random) -> str:
    from retia.spaces import zennas

    return shrink_structure(zennas.random_structure(rng, "XXBL"))


def _zennas_build(structure: str) -> nn.Module:
    from retia.spaces import zennas

    if not isinstance(structure, str):
        raise RetiaError(f"Zen-NAS arch {structure!r}: expected a structure string")
    return zennas.build(structure, num_classes=NUM_CLASSES)


SPACES: dict[str, FamilySpace] = {
    "autoformer": FamilySpace("autoformer", 32, _autoformer_sample, _autoformer_build),
    "zennas": FamilySpace("zennas", 16, _zennas_sample, _zennas_build),
}


def get_space(name: str) -> FamilySpace:
    if name not in SPACES:
        raise RetiaError(f"family space {name!r}: expected one of {', '.join(SPACES)}")
    return SPACES[name]


def sample_archs(space: str | FamilySpace, n: int, seed: int = 0) -> list[Any]:
    """``n`` distinct archs drawn in order from a ``seed``-ed generator; a longer list starts with the shorter one
    (so a family can grow by re-running with a larger ``n``)."""
    sp = get_space(space) if isinstance(space, str) else space
    if not isinstance(n, int) or n < 1:
        raise RetiaError(f"family size {n!r}: expected a positive integer")
    rng = random.Random(f"{sp.name}:{seed}")
    out, seen = [], set()
    for _ in range(100 * n):
        arch = sp.sample(rng)
        key = sp.key(arch)
        if key not in seen:
            seen.add(key)
            out.append(arch)
            if len(out) == n:
                return out
    raise RetiaError(f"family size {n}: the {sp.name} space gave only {len(out)} distinct archs")


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Brief training of one arch: AdamW, ``warmup`` (a fraction of the steps) then cosine, batch 64."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    min_lr: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise RetiaError(f"epochs {self.epochs!r}: expected a positive integer")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RetiaError(f"batch size {self.batch_size!r}: expected a positive integer")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise RetiaError(f"lr={self.lr!r}, warmup={self.warmup!r}, weight_decay={self.weight_decay!r}: "
                             "expected lr > 0, 0 <= warmup < 1, weight_decay >= 0")


@functools.lru_cache(maxsize=4)
def digits_split(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: the embedded digits at ``image_size``², split as
    :class:`retia.data.DigitsDataModule` splits them (seed 0, 20 % validation)."""
    from retia.data.digits import digits_tensors, split_indices

    images, labels = digits_tensors(image_size)
    train, val = split_indices(len(labels), 0.2, 0)
    return images[train], labels[train], images[val], labels[val]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # as ClassificationModule: no decay on biases, norms, tokens and position tables
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) or "embeddings_table" in name
             else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_model(model: nn.Module, data: Sequence[torch.Tensor], settings: TrainSettings,
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Train ``model`` in place on ``data`` (``x_train, y_train, ...``) with ``settings``; seeded."""
    from retia.evaluators.classification import warmup_cosine

    x, y = data[0], data[1]
    forward = forward or model
    gen = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = -(-len(y) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    lr_at = warmup_cosine(total, int(total * settings.warmup), settings.lr, min(1e-6, settings.lr),
                          min(settings.min_lr, settings.lr))
    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)
    model.train()
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = nn.functional.cross_entropy(forward(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return model


def evaluate_model(model: nn.Module, data: Sequence[torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Top-1 / top-5 (%) on the validation part of ``data``."""
    from retia.evaluators.weight_sharing import accuracy

    x, y = data[2], data[3]
    return accuracy(model, [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])


def label_arch(space: str | FamilySpace, arch: Any, settings: TrainSettings = TrainSettings()
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` (seeded), train it and measure it: ``(trained model, {'top1', 'top5', 'seconds'})``."""
    sp = get_space(space) if isinstance(space, str) else space
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = sp.build(arch)
    data = digits_split(sp.resolution)
    train_model(model, data, settings)
    scores = evaluate_model(model, data)
    return model, {**scores, "seconds": round(time.perf_counter() - start, 3)}


def arch_graph(space: str | FamilySpace, arch: Any, name: str, labels: dict[str, Any] | None = None,
               model: nn.Module | None = None) -> CompGraph:
    """The graph of ``arch`` (FLOPs and params profiled), its meta holding the space, the arch and ``labels``."""
    sp = get_space(space) if isinstance(space, str) else space
    model = model if model is not None else sp.build(arch)
    return build_graph(model, sp.input_shape, name=name, meta={"space": sp.name, "arch": arch, **(labels or {})})


# ---------------------------------------------------------------------------------------------------------------
# family files
# ---------------------------------------------------------------------------------------------------------------
def journal_path(path: str | Path) -> Path:
    """``family.safetensors`` -> ``family.labels.jsonl``."""
    return Path(path).with_suffix(".labels.jsonl")


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    if not path.exists():
        return None, []
    header, rows = None, []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill: that arch is trained again
            continue
        if "header" in obj:
            header = obj["header"]
        else:
            rows.append(obj)
    return header, rows


def _append(path: Path, obj: dict) -> None:
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a line cut by a kill: start on a new line
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_family(graphs: list[CompGraph], path: Path, meta: dict[str, Any]) -> None:
    # write beside, then move into place: a reader never sees a half-written file
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    save_graphs(graphs, tmp, meta=meta)
    os.replace(tmp.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(tmp, path)


def build_family(space: str, n: int, path: str | Path, settings: TrainSettings = TrainSettings(), seed: int = 0,
                 progress: bool = True, on_arch: Callable[[CompGraph, nn.Module], None] | None = None
                 ) -> list[CompGraph]:
    """Train and label ``n`` archs of ``space`` (sampled with ``seed``) into ``path`` (see the module docstring).

    Resumes from ``path``'s journal; a journal of other settings is refused. ``on_arch(graph, model)`` sees every
    newly trained arch.
    """
    sp = get_space(space)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetiaError(f"family file {str(path)!r}: expected a .safetensors file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    archs = sample_archs(sp, n, seed)
    header = {"format": FAMILY_FORMAT, "space": sp.name, "seed": seed, "resolution": sp.resolution,
              "train": dataclasses.asdict(settings)}
    journal = journal_path(path)
    old_header, rows = _read_journal(journal)
    if old_header is not None and old_header != header:
        raise RetiaError(f"family journal {str(journal)!r} was written with {json.dumps(old_header, sort_keys=True)}, "
                         f"expected {json.dumps(header, sort_keys=True)}: use another output file")
    if old_header is None:
        journal.write_text("")
        _append(journal, {"header": header})
    done = {sp.key(r["arch"]): r for r in rows}
    graphs = [arch_graph(sp, r["arch"], r["name"], r["labels"]) for r in rows if sp.key(r["arch"]) in
              {sp.key(a) for a in archs}]
    todo = [(i, a) for i, a in enumerate(archs) if sp.key(a) not in done]
    meta = {"family": header}
    if graphs and not todo:
        _write_family(graphs, path, meta)
        return graphs
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - len(todo), desc=f"{sp.name} family", unit="arch", file=sys.stdout)
    try:
        for i, arch in todo:
            model, labels = label_arch(sp, arch, dataclasses.replace(settings, seed=settings.seed + i))
            labels["train_seed"] = settings.seed + i
            name = f"{sp.name}-{i:03d}-{hashlib.sha1(sp.key(arch).encode()).hexdigest()[:8]}"
            graph = arch_graph(sp, arch, name, labels, model)
            _append(journal, {"name": name, "arch": arch, "labels": labels})
            graphs.append(graph)
            _write_family(graphs, path, meta)
            if on_arch is not None:
                on_arch(graph, model)
            if bar is not None:
                bar.set_postfix(top1=f"{labels['top1']:.1f}", s=f"{labels['seconds']:.1f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return graphs


def family_labels(graphs: Sequence[CompGraph], metric: str = "top1") -> np.ndarray:
    """The ``metric`` of every graph (from its meta) as floats."""
    missing = [g.name for g in graphs if metric not in g.meta]
    if missing:
        raise RetiaError(f"graph {missing[0]!r} has no label {metric!r} in its meta (expected a labelled family)")
    return np.array([float(g.meta[metric]) for g in graphs])


def load_family(path: str | Path, metric: str = "top1") -> tuple[list[CompGraph], np.ndarray]:
    """``(graphs, labels)`` of a family file."""
    path = Path(path)
    if not path.is_file():
        raise RetiaError(f"family file {str(path)!r} does not exist")
    graphs = load_graphs(path)
    return graphs, family_labels(graphs, metric)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from retia.cli import add_threads_arg, positive_int

    p = argparse.ArgumentParser(prog="python -m retia.evaluators.aiop.family", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, choices=sorted(SPACES), help="the retia space to sample")
    p.add_argument("--n", type=positive_int, default=40, help="architectures (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=TrainSettings.epochs, help="training epochs per arch")
    p.add_argument("--batch-size", type=positive_int, default=TrainSettings.batch_size)
    p.add_argument("--lr", type=float, default=TrainSettings.lr)
    p.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    p.add_argument("-o", "--output", required=True, help="family file (.safetensors; + .json, .labels.jsonl)")
    p.add_argument("--shared-head", action="store_true",
                   help="also label every arch with the shared-head shortcut (autoformer only) and report its "
                        "SRCC / Kendall tau against the trained labels")
    p.add_argument("--supernet-epochs", type=positive_int, default=20, help="shared head: supernet epochs")
    p.add_argument("--head-archs", type=positive_int, default=24, help="shared head: subnets it is trained on")
    p.add_argument("--no-progress", action="store_true")
    add_threads_arg(p)
    return p


def main(argv: list[str] | None = None) -> list[CompGraph]:
    from retia.cli import quiet, set_threads

    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if args.shared_head and args.space != "autoformer":
        raise RetiaError(f"--shared-head needs a supernet: expected --space autoformer, got {args.space!r}")
    graphs = build_family(args.space, args.n, args.output, settings, seed=args.seed, progress=not args.no_progress)
    labels = family_labels(graphs)
    print(f"{len(graphs)} {args.space} archs in {args.output}: top-1 {labels.min():.1f}..{labels.max():.1f} % "
          f"(mean {labels.mean():.1f}), {sum(g.meta['seconds'] for g in graphs):.0f} s of training")
    if args.shared_head:
        from .shared_head import label_family_shared_head

        report = label_family_shared_head(args.output, supernet_epochs=args.supernet_epochs,
                                          head_archs=args.head_archs, seed=args.seed,
                                          progress=not args.no_progress)
        print(f"shared-head labels vs trained: SRCC {report['srcc']:.3f}, Kendall tau {report['kendall']:.3f} "
              f"(n={report['n']}, {report['seconds']:.0f} s)")
    return graphs


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
