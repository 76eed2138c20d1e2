"""HR-NAS search by progressive shrinking (classification), as an NNI experiment.

``python experiments/hrnas_search.py`` with no arguments: the ``tiny`` supernet on the embedded digits (32x32),
a CPU-sized run of a few minutes. Writes to ``--output`` (default ``runs/hrnas-search``):

* ``arch.json`` — the searched arch dict (+ ``macs``, ``params``, ``config``), ``best_model.json`` — the same arch in
  the original's ``inverted_residual_setting`` format, ``tokens.json`` — tokens per transformer (block order);
* ``searched.safetensors`` (+ ``.json`` sidecar: kind, config, arch) — the shrunk network's weights;
* ``trials.jsonl`` / ``.csv`` / ``.json`` — one row per epoch (MACs, parameters, validation top-1, whether it
  shrank), ``macs.png`` (MACs vs epoch) and ``accuracy.png`` (validation top-1 vs epoch);
* ``logs/`` (TensorBoard + CSV) and ``nni/`` (NNI's experiment directory);
* ``config.yaml`` — the experiment config the run used (the schema :class:`HRNASSearchConfig`, resolved).

``--config FILE.yml [overrides]`` reads the experiment from a YAML file (``experiments/configs/hrnas/*.yml``; includes,
``${ENV}`` variables, dotted keys, see :mod:`retia.config`) and applies command-line overrides ``--train.epochs 2``,
``train.epochs=2`` (the flags below work too: ``--epochs 2``). Without ``--config`` the flags below set the same
config, whose defaults are the flags' defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `retia` importable from a source checkout as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retia.cli import add_threads_arg, quiet, run_main, seed_everything, set_threads  # noqa: E402
from retia.errors import RetiaError  # noqa: E402

SUBNET_KIND = "hrnas-searched"
AVAILABLE_TASKS = ("classification",)
OPTIMIZERS = ("adamw",)
SCHEDULERS = ("cosine",)


# ---------------------------------------------------------------------------------------------------------------
# experiment config schema (what --config files may set; the defaults are the flags' defaults)
# ---------------------------------------------------------------------------------------------------------------
class Task(Enum):
    classification = "classification"
    segmentation = "segmentation"
    keypoint = "keypoint"


@dataclass
class ModelConfig:
    preset: str = "tiny"  # retia.spaces.hrnas.PRESETS key
    # overrides of the preset (None: the preset's value)
    width_mult: Optional[float] = None
    input_size: Any = None  # int, or [height, width]
    num_classes: Optional[int] = None
    last_channel: Optional[int] = None
    max_tokens: Optional[int] = None


@dataclass
class DataConfig:
    path: Optional[str] = None  # ImageFolder / CIFAR directory; None: the embedded data
    batch_size: int = 64


@dataclass
class TrainConfig:
    epochs: int = 8
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    learning_rate: float = 1e-2
    weight_decay: float = 0.01  # not on BN / biases
    warmup: float = 1.0  # learning-rate warmup epochs
    label_smoothing: float = 0.1
    limit_train_batches: Optional[float] = None
    accelerator: str = "cpu"


@dataclass
class SearchConfig:
    rho: float = 5e-3  # weight of the resource-aware L1 penalty
    epoch_free: float = 0.0  # epochs without penalty
    epoch_warmup: float = 2.0  # epoch at which rho reaches its value
    threshold: float = 1e-3  # |BN scale| at or under which a channel / token is removed
    interval: int = 2  # epochs between shrink checks
    min_delta_macs: float = 0.0  # shrink only when at least this many MACs go
    tokens: bool = True  # also remove transformer tokens


@dataclass
class HRNASSearchConfig:
    task: Task = Task.classification
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    output: str = "runs/hrnas-search"
    seed: int = 0
    threads: int = 1


# the flags, as config keys (also accepted after --config: `--epochs 2` == `--train.epochs 2`)
FLAG_KEYS = {
    "preset": "model.preset", "width_mult": "model.width_mult", "image_size": "model.input_size",
    "datapath": "data.path", "batch_size": "data.batch_size", "epochs": "train.epochs",
    "learning_rate": "train.learning_rate", "weight_decay": "train.weight_decay", "warmup": "train.warmup",
    "limit_train_batches": "train.limit_train_batches", "accelerator": "train.accelerator", "rho": "search.rho",
    "epoch_free": "search.epoch_free", "epoch_warmup": "search.epoch_warmup", "threshold": "search.threshold",
    "interval": "search.interval", "min_delta_macs": "search.min_delta_macs", "output": "output", "seed": "seed",
    "threads": "threads",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="--config FILE.yml [--a.b value | a.b=value ...]: the experiment from a YAML "
                                       "config (experiments/configs/hrnas/*.yml) with overrides; see docs/hrnas.md")
    p.add_argument("--config", default=None, help="YAML experiment config; the other arguments then override its keys")
    p.add_argument("--preset", default="tiny", help="supernet preset (tiny, cpu, cls_imagenet; default %(default)s)")
    p.add_argument("--width-mult", type=float, default=None, help="width multiplier (default: the preset's)")
    p.add_argument("--datapath", default=None, help="ImageFolder / CIFAR directory (default: embedded digits)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-2,
                   help="AdamW peak rate (cosine decay); BN scales move at most about this much per step")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=1, help="learning-rate warmup epochs")
    p.add_argument("--rho", type=float, default=5e-3, help="weight of the resource-aware L1 penalty")
    p.add_argument("--epoch-free", type=float, default=0, help="epochs without penalty")
    p.add_argument("--epoch-warmup", type=float, default=2, help="epoch at which rho reaches its value")
    p.add_argument("--threshold", type=float, default=1e-3,
                   help="|BN scale| at or under which a channel/token is removed (the original's 1e-3)")
    p.add_argument("--interval", type=int, default=2, help="epochs between shrink checks")
    p.add_argument("--min-delta-macs", type=float, default=0, help="shrink only when at least this many MACs go")
    p.add_argument("--no-tokens", action="store_true", help="do not remove transformer tokens")
    p.add_argument("--limit-train-batches", type=float, default=None, help="Lightning's limit_train_batches")
    p.add_argument("--output", default="runs/hrnas-search")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    return p


def parse_config(argv: list[str] | None = None):
    """The experiment config (:class:`HRNASSearchConfig`, a read-only OmegaConf ``DictConfig``) from the command
    line: ``--config FILE [overrides]``, or the flags."""
    from retia.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = None, []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise RetiaError("--config: expected a YAML file after it")
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    if path is None:
        args = build_parser().parse_args(argv)
        pairs = [(key, getattr(args, flag)) for flag, key in FLAG_KEYS.items()]
        pairs.append(("search.tokens", not args.no_tokens))
        return load_config(None, pairs, schema=HRNASSearchConfig)
    if "-h" in rest or "--help" in rest:
        build_parser().print_help()
        raise SystemExit(0)
    rest = [a for a in rest if a != "--no-tokens"] + (["search.tokens=false"] if "--no-tokens" in rest else [])
    return load_config(path, rest, schema=HRNASSearchConfig, aliases=FLAG_KEYS)


def check_config(c) -> None:
    """What the config asks for that this entry point cannot do yet: one line each."""
    task = c.task.value
    if task not in AVAILABLE_TASKS:
        raise RetiaError(f"task {task!r} is not available yet (available: {', '.join(AVAILABLE_TASKS)})")
    if c.train.optimizer not in OPTIMIZERS:
        raise RetiaError(f"train.optimizer {c.train.optimizer!r} is not available yet (available: {', '.join(OPTIMIZERS)})")
    if c.train.scheduler not in SCHEDULERS:
        raise RetiaError(f"train.scheduler {c.train.scheduler!r} is not available yet (available: {', '.join(SCHEDULERS)})")
    if c.train.epochs < 1:
        raise RetiaError(f"train.epochs {c.train.epochs} (--epochs): expected >= 1")
    if c.threads < 1:
        raise RetiaError(f"threads {c.threads}: expected a positive integer")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    c = parse_config(argv)
    check_config(c)
    set_threads(c.threads)
    quiet()
    seed_everything(c.seed)
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.data import build_datamodule
    from retia.evaluators.classification import classification_evaluator
    from retia.results import RunDir
    from retia.spaces.hrnas import HRNASSpace, count_macs, to_best_model, tokens_list
    from retia.strategies.hrnas_shrinking import ProgressiveShrinkingStrategy
    from retia.weights import save_weights

    from retia.config import to_dict, to_yaml

    model = to_dict(c)["model"]
    overrides = {k: v for k, v in model.items() if k != "preset" and v is not None}
    if c.task.value != "classification":  # a classification-layout preset (tiny, cpu) with another task's head
        overrides["task"] = c.task.value
    space = HRNASSpace(c.model.preset, **overrides)
    cfg = space.config
    if cfg["task"] != c.task.value:
        raise RetiaError(f"task {c.task.value!r} but model.preset {c.model.preset!r} is a {cfg['task']} network: "
                         "expected the same task")
    size = cfg["input_size"] if isinstance(cfg["input_size"], int) else cfg["input_size"][0]
    datamodule = build_datamodule(c.data.path, image_size=size, batch_size=c.data.batch_size)
    num_classes = getattr(datamodule, "num_classes", None)
    if num_classes and num_classes != cfg["num_classes"]:
        space = HRNASSpace(c.model.preset, **dict(overrides, num_classes=num_classes))
        cfg = space.config

    out = Path(c.output)
    run = RunDir(out)
    (out / "config.yaml").write_text(to_yaml(c))

    def on_epoch(rec):
        run.log_trial({"epoch": rec.epoch, "macs": rec.macs, "params": rec.params, "shrunk": rec.shrunk,
                       "top1": 100 * rec.metrics.get("val_top1", float("nan")), "seconds": round(rec.seconds, 2)})

    s = c.search
    strategy = ProgressiveShrinkingStrategy(
        rho=s.rho, epoch_free=s.epoch_free, epoch_warmup=s.epoch_warmup, threshold=s.threshold,
        interval=s.interval, min_delta_macs=s.min_delta_macs, tokens=s.tokens, on_epoch=on_epoch)
    t = c.train
    evaluator = classification_evaluator(
        datamodule, num_classes=cfg["num_classes"], max_epochs=t.epochs, log_dir=out / "logs",
        accelerator=t.accelerator, limit_train_batches=t.limit_train_batches, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_epochs=t.warmup, label_smoothing=t.label_smoothing, mixup=0.0,
        cutmix=0.0, report_to_nni=False)
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = str((out / "nni").resolve())
    experiment.config.execution_engine = SequentialEngineConfig()
    experiment.config.model_format = RawModelFormatConfig()
    start = time.perf_counter()
    initial_macs = count_macs(cfg)
    experiment.run()
    seconds = time.perf_counter() - start

    arch, net = strategy.arch, strategy.network
    macs = count_macs(cfg, arch)
    params = sum(p.numel() for p in net.parameters())
    # the epoch's validation ran before that epoch's shrink: measure the searched network itself
    top1 = _top1(net, datamodule)
    last_val = strategy.final_metric
    summary = {"arch": arch, "macs": macs, "supernet_macs": initial_macs, "params": params, "top1": 100 * top1,
               "top1_before_last_shrink": None if last_val is None else 100 * last_val,
               "seconds": round(seconds, 1), "config": cfg}
    run.write_json("arch.json", summary)
    (out / "best_model.json").write_text(json.dumps(to_best_model(cfg, arch)) + "\n")
    run.write_json("tokens.json", tokens_list(cfg, arch))
    save_weights(net.state_dict(), out / "searched.safetensors", {"kind": SUBNET_KIND, "config": cfg, "arch": arch})
    _plots(run)
    print(f"searched: {macs / 1e6:.2f}M MACs (supernet {initial_macs / 1e6:.2f}M), {params / 1e6:.3f}M params, "
          f"top-1 {summary['top1']:.1f}% in {seconds:.0f} s -> {out}")
    return summary


def _top1(net, datamodule) -> float:
    """Validation top-1 (fraction) of ``net`` in eval mode."""
    import torch

    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


def _plots(run) -> None:
    from retia.results import _pyplot

    rows = [t for t in run.trials() if t.get("epoch") is not None]
    plt = _pyplot()
    for key, name, label, scale in (("macs", "macs.png", "MMACs", 1e6), ("top1", "accuracy.png", "val top-1 (%)", 1)):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([r["epoch"] + 1 for r in rows], [r[key] / scale for r in rows], "o-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        run._save(fig, name)


if __name__ == "__main__":
    run_main(main)
