"""HR-NAS search by progressive shrinking (classification, segmentation; keypoints once its task modules exist),
as an NNI experiment.

``python experiments/hrnas_search.py`` with no arguments: the ``tiny`` supernet on the embedded digits (32x32),
a CPU-sized run of a few minutes; ``--config experiments/configs/hrnas/seg_cpu.yml``: the same for segmentation
on the embedded synthetic shapes (mIoU). The task table :data:`TASKS` gives each task's data, Lightning
evaluator, final metric and metric name (``top1`` / ``miou`` / ``ap``). Writes to ``--output`` (default
``runs/hrnas-search``):

* ``arch.json`` — the searched arch dict (+ ``macs``, ``params``, the task metric of the searched network,
  ``config``), ``best_model.json`` — the same arch in the original's ``inverted_residual_setting`` format,
  ``tokens.json`` — tokens per transformer (block order);
* ``searched.safetensors`` (+ ``.json`` sidecar: kind, config, arch) — the shrunk network's weights (the EMA
  weights when ``train.ema_decay`` > 0; BN statistics recalibrated when ``search.bn_recalibration_batches`` > 0);
* ``trials.jsonl`` / ``.csv`` / ``.json`` — one row per epoch (MACs, parameters, the validation metric in %,
  whether it shrank), ``macs.png`` (MACs vs epoch) and the metric vs epoch: ``accuracy.png`` (top-1,
  classification), ``miou.png`` (segmentation), ``ap.png`` (keypoints);
* ``logs/`` (TensorBoard + CSV) and ``nni/`` (NNI's experiment directory);
* ``config.yaml`` — the experiment config the run used (the schema :class:`HRNASSearchConfig`, resolved).

``--config FILE.yml [overrides]`` reads the experiment from a YAML file (``experiments/configs/hrnas/*.yml``; includes,
``${ENV}`` variables, dotted keys, see :mod:`retia.config`) and applies command-line overrides ``--train.epochs 2``,
``train.epochs=2`` (the flags below work too: ``--epochs 2``). Without ``--config`` the flags below set the same
config, whose defaults are the flags' defaults.

Several processes (Lightning's DDP): ``--train.devices 2 --train.strategy ddp`` (``train.num_nodes``,
``train.sync_batchnorm`` on GPUs, ``train.precision``, ``data.num_workers``); Lightning's launcher re-runs this
script for the other ranks (or torchrun / SLURM start them), every rank runs the search in step, and only the global
rank 0 writes the files above.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make `retia` importable from a source checkout as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retia.cli import add_threads_arg, quiet, run_main, seed_everything, set_threads  # noqa: E402
from retia.errors import RetiaError  # noqa: E402

SUBNET_KIND = "hrnas-searched"
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
    batch_size: int = 64  # per process (under DDP each rank loads this many)
    num_workers: int = 0  # data-loader worker processes (per rank)


@dataclass
class TrainConfig:
    epochs: int = 8
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    learning_rate: float = 1e-2
    weight_decay: float = 0.01  # not on BN / biases
    warmup: float = 1.0  # learning-rate warmup epochs
    label_smoothing: float = 0.1  # classification only
    limit_train_batches: Optional[float] = None
    accelerator: str = "cpu"
    ema_decay: float = 0.0  # EMA of the weights (validated on, shrunk with the network, the result); 0: off
    # Lightning's DDP (several processes; see docs/hrnas.md "Multi-GPU and multi-node")
    devices: Any = 1  # per node: an int >= 1, -1 (all), "auto", or a list of GPU indices
    strategy: str = "auto"  # one of STRATEGIES ("auto" is "ddp" for several devices)
    num_nodes: int = 1
    sync_batchnorm: bool = False  # SyncBatchNorm across the ranks (GPUs only)
    precision: Optional[str] = None  # Lightning's precision, e.g. "16-mixed", "bf16-mixed"; None: 32-bit


@dataclass
class SearchConfig:
    rho: float = 5e-3  # weight of the resource-aware L1 penalty
    epoch_free: float = 0.0  # epochs without penalty
    epoch_warmup: float = 2.0  # epoch at which rho reaches its value
    threshold: float = 1e-3  # |BN scale| at or under which a channel / token is removed
    interval: int = 2  # epochs between shrink checks
    min_delta_macs: float = 0.0  # shrink only when at least this many MACs go
    tokens: bool = True  # also remove transformer tokens
    bn_recalibration_batches: int = 10  # re-estimate BN statistics of the final network on this many batches; 0: off


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
    "threads": "threads", "ema_decay": "train.ema_decay", "bn_recalibration_batches": "search.bn_recalibration_batches",
    "devices": "train.devices", "strategy": "train.strategy", "num_nodes": "train.num_nodes",
    "sync_batchnorm": "train.sync_batchnorm", "precision": "train.precision", "num_workers": "data.num_workers",
}
# Lightning strategies the shrinking search runs under: one process, or DDP started by the subprocess launcher
# (torchrun, SLURM or Lightning re-running the script), whose wrapper ProgressiveShrinking re-wraps after a shrink.
# ddp_spawn / fork would hand the network back to the main process by a state dict, which a shrink changes.
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


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
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the weights, e.g. 0.9999 (validated on, shrunk with the network; default 0: off)")
    p.add_argument("--bn-recalibration-batches", type=int, default=10,
                   help="re-estimate the searched network's BN statistics on this many training batches (0: off)")
    p.add_argument("--limit-train-batches", type=float, default=None, help="Lightning's limit_train_batches")
    p.add_argument("--output", default="runs/hrnas-search")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=_devices_arg, default=1,
                   help="processes per node (DDP when > 1): an int, -1 (all GPUs), auto, or GPU indices 0,1")
    p.add_argument("--strategy", default="auto", help=f"Lightning strategy: {', '.join(STRATEGIES)}")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes of a DDP run (SLURM / torchrun)")
    p.add_argument("--sync-batchnorm", action="store_true", help="SyncBatchNorm across the DDP ranks (GPUs only)")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. 16-mixed (default: 32-bit)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    return p


def _devices_arg(text: str):
    """--devices: ``auto``, an int, or comma-separated GPU indices (a list)."""
    if text == "auto":
        return text
    try:
        return [int(t) for t in text.split(",") if t.strip()] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int, auto, or GPU indices such as 0,1") from None


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
    # the switch --sync-batchnorm without a value (followed by true / false it is an ordinary override)
    rest = ["train.sync_batchnorm=true" if a in ("--sync-batchnorm", "--sync_batchnorm")
            and (i + 1 == len(rest) or rest[i + 1].lower() not in _BOOL_WORDS) else a for i, a in enumerate(rest)]
    return load_config(path, rest, schema=HRNASSearchConfig, aliases=FLAG_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# tasks: data, evaluator, final metric (adding a task = one TaskSpec in TASKS)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """What the search (and ``hrnas_retrain.py``) needs to know about a task.

    ``datamodule(config, (h, w))`` builds the data; ``outputs(datamodule)`` the classes / joints the data has
    (None: keep the network config's); ``evaluator(config, datamodule, net_config, log_dir, callbacks)`` the NNI
    Lightning evaluator, whose module logs ``monitor`` (a fraction) each validation; ``evaluate(net,
    datamodule)`` the final metric (a fraction) of a network. ``metric`` names the trials column / summary key
    (in %), ``plot`` the metric's plot file. ``modules``: what must be importable for the task to be available.
    """

    name: str
    metric: str
    monitor: str
    plot: str
    label: str
    datamodule: Callable[[Any, tuple[int, int]], Any]
    outputs: Callable[[Any], Optional[int]]
    evaluator: Callable[..., Any]
    evaluate: Callable[[Any, Any], float]
    modules: tuple[str, ...] = ()

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


def _device(net):
    return next(net.parameters()).device


def _trainer_kwargs(c) -> dict[str, Any]:
    """The Lightning trainer settings of ``train.*`` that every task's evaluator passes on."""
    from retia.config import to_dict

    t = c.train
    return {"accelerator": t.accelerator, "devices": to_dict(c.train)["devices"], "strategy": t.strategy,
            "num_nodes": t.num_nodes, "sync_batchnorm": t.sync_batchnorm, "precision": t.precision,
            "limit_train_batches": t.limit_train_batches}


def _classification_data(c, hw):
    from retia.data import build_datamodule

    return build_datamodule(c.data.path, image_size=hw[0], batch_size=c.data.batch_size,
                            num_workers=c.data.num_workers)


def _classification_evaluator(c, datamodule, cfg, log_dir, callbacks=None):
    from retia.evaluators.classification import classification_evaluator

    t = c.train
    return classification_evaluator(
        datamodule, num_classes=cfg["num_classes"], max_epochs=t.epochs, log_dir=log_dir, callbacks=callbacks,
        **_trainer_kwargs(c), learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_epochs=t.warmup,
        label_smoothing=t.label_smoothing, mixup=0.0, cutmix=0.0, report_to_nni=False)


def _top1(net, datamodule) -> float:
    """Validation top-1 (fraction) of ``net`` in eval mode."""
    import torch

    net.eval()
    dev = _device(net)
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            correct += int((net(x.to(dev)).argmax(1).cpu() == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


def _segmentation_data(c, hw):
    from retia.data import build_segmentation_datamodule

    if c.data.path is None:
        if hw[0] != hw[1]:
            raise RetiaError(f"model.input_size {list(hw)}: the embedded synthetic shapes are square; expected one "
                             "int (or a Cityscapes / ADE20K data.path)")
        return build_segmentation_datamodule(None, image_size=hw[0], batch_size=c.data.batch_size, seed=c.seed,
                                             num_workers=c.data.num_workers)
    return build_segmentation_datamodule(c.data.path, image_size=list(hw), batch_size=c.data.batch_size,
                                         seed=c.seed, num_workers=c.data.num_workers)


def _segmentation_evaluator(c, datamodule, cfg, log_dir, callbacks=None):
    from retia.evaluators.segmentation import segmentation_evaluator

    t = c.train
    return segmentation_evaluator(
        datamodule, max_epochs=t.epochs, log_dir=log_dir, num_classes=cfg["num_classes"], callbacks=callbacks,
        **_trainer_kwargs(c), learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_epochs=t.warmup,
        ignore_index=getattr(datamodule, "ignore_index", 255), report_to_nni=False)


def _miou(net, datamodule) -> float:
    """Validation mIoU (fraction) of ``net`` in eval mode: one confusion matrix over the whole validation set."""
    import torch

    from retia.evaluators.segmentation import SegmentationMetrics

    net.eval()
    dev = _device(net)
    metrics = SegmentationMetrics(net.config["num_classes"], getattr(datamodule, "ignore_index", 255)).to(dev)
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            metrics.update(net(x.to(dev)), y.to(dev))
    return float(metrics.compute()["miou"])


def _keypoint_data(c, hw):
    from retia.data.keypoints import build_keypoint_datamodule

    # the embedded synthetic people learn in a few CPU epochs only with sharper heatmaps and no extra rotation
    # (measured in docs/hrnas.md "Keypoints"); a real COCO tree keeps the original's sigma 2 and full augmentation
    synthetic = {"sigma": 1.0, "rotation_prob": 0.0} if c.data.path is None else {}
    return build_keypoint_datamodule(c.data.path, input_size=tuple(hw), batch_size=c.data.batch_size, seed=c.seed,
                                     num_workers=c.data.num_workers, **synthetic)


def _keypoint_evaluator(c, datamodule, cfg, log_dir, callbacks=None):
    from retia.evaluators.keypoints import keypoint_evaluator

    t = c.train
    return keypoint_evaluator(datamodule, max_epochs=t.epochs, log_dir=log_dir, num_joints=cfg["num_classes"],
                              callbacks=callbacks, **_trainer_kwargs(c),
                              learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_epochs=t.warmup,
                              report_to_nni=False)


def _keypoint_ap(net, datamodule) -> float:
    from retia.evaluators.keypoints import evaluate_keypoints

    net.eval()
    return float(evaluate_keypoints(net, datamodule)["AP"])


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec("classification", "top1", "val_top1", "accuracy.png", "val top-1 (%)",
                               _classification_data, lambda dm: getattr(dm, "num_classes", None),
                               _classification_evaluator, _top1),
    "segmentation": TaskSpec("segmentation", "miou", "val_miou", "miou.png", "val mIoU (%)", _segmentation_data,
                             lambda dm: getattr(dm, "num_classes", None), _segmentation_evaluator, _miou),
    "keypoint": TaskSpec("keypoint", "ap", "val_ap", "ap.png", "val AP (%)", _keypoint_data,
                         lambda dm: getattr(dm, "num_joints", None), _keypoint_evaluator, _keypoint_ap,
                         modules=("retia.data.keypoints", "retia.evaluators.keypoints")),
}


def available_tasks() -> list[str]:
    return [name for name, spec in TASKS.items() if spec.available()]


def task_spec(c) -> TaskSpec:
    """The config's task, or a one-line error when this installation cannot run it."""
    task = c.task.value
    spec = TASKS.get(task)
    if spec is None or not spec.available():
        raise RetiaError(f"task {task!r} is not available yet (available: {', '.join(available_tasks())})")
    return spec


def check_config(c) -> None:
    """What the config asks for that this entry point cannot do (yet): one line each."""
    task_spec(c)
    if c.train.optimizer not in OPTIMIZERS:
        raise RetiaError(f"train.optimizer {c.train.optimizer!r} is not available yet (available: {', '.join(OPTIMIZERS)})")
    if c.train.scheduler not in SCHEDULERS:
        raise RetiaError(f"train.scheduler {c.train.scheduler!r} is not available yet (available: {', '.join(SCHEDULERS)})")
    if c.train.epochs < 1:
        raise RetiaError(f"train.epochs {c.train.epochs} (--epochs): expected >= 1")
    if not 0 <= c.train.ema_decay < 1:
        raise RetiaError(f"train.ema_decay {c.train.ema_decay} (--ema-decay): expected 0 (off) or a number in (0, 1)")
    if c.search.bn_recalibration_batches < 0:
        raise RetiaError(f"search.bn_recalibration_batches {c.search.bn_recalibration_batches}: expected >= 0 (0: off)")
    if c.threads < 1:
        raise RetiaError(f"threads {c.threads}: expected a positive integer")
    check_distributed(c)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_distributed(c) -> None:
    """The Lightning / DDP keys: ``train.devices``, ``train.strategy``, ``train.num_nodes``, ``train.sync_batchnorm``,
    ``train.precision``, ``data.num_workers`` (one line per mistake)."""
    from retia.config import to_dict

    t = c.train
    devices = to_dict(c.train)["devices"]
    cpu = t.accelerator == "cpu"
    if cpu:  # Lightning counts CPU processes, it has no CPU indices
        ok = devices == "auto" or (_is_int(devices) and devices >= 1)
        expected = "an int >= 1 (processes) or 'auto' with train.accelerator 'cpu'"
    else:
        ok = (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
              or (isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices)
                  and len(set(devices)) == len(devices)))
        expected = "an int >= 1, -1 (all), 'auto' or a list of distinct device indices"
    if not ok:
        raise RetiaError(f"train.devices {devices!r} (--devices): expected {expected}")
    if t.strategy not in STRATEGIES:
        raise RetiaError(f"train.strategy {t.strategy!r} (--strategy): expected one of {', '.join(STRATEGIES)} (the "
                         "shrinking search re-wraps DDP after each shrink; spawned processes are not supported)")
    if t.num_nodes < 1:
        raise RetiaError(f"train.num_nodes {t.num_nodes} (--num-nodes): expected an int >= 1")
    if t.sync_batchnorm and cpu:
        raise RetiaError("train.sync_batchnorm true with train.accelerator 'cpu': SyncBatchNorm runs on GPUs only; "
                         "expected false on the CPU")
    if t.precision is not None and str(t.precision) not in PRECISIONS:
        raise RetiaError(f"train.precision {t.precision!r} (--precision): expected null (32-bit) or one of "
                         f"{', '.join(PRECISIONS)}")
    if c.data.num_workers < 0:
        raise RetiaError(f"data.num_workers {c.data.num_workers} (--num-workers): expected an int >= 0")


def model_overrides(c, **extra) -> dict[str, Any]:
    """The network config keys the experiment config sets on top of its preset."""
    from retia.config import to_dict

    model = to_dict(c)["model"]
    overrides = {k: v for k, v in model.items() if k != "preset" and v is not None}
    if c.task.value != "classification":  # a classification-layout preset (tiny, cpu) with another task's head
        overrides["task"] = c.task.value
    overrides.update(extra)
    return overrides


def build_task(c, build_space: bool = True):
    """``(task spec, network config, datamodule, space)`` of an experiment config: the network config is the
    preset with the config's overrides and the data's number of classes / joints; ``space`` is the
    :class:`~retia.spaces.hrnas.HRNASSpace` (None unless ``build_space``)."""
    from retia.spaces.hrnas import HRNASSpace, resolve_config
    from retia.spaces.hrnas.network import input_hw

    spec = task_spec(c)
    overrides = model_overrides(c)
    cfg = resolve_config(c.model.preset, **overrides)
    if cfg["task"] != c.task.value:
        raise RetiaError(f"task {c.task.value!r} but model.preset {c.model.preset!r} is a {cfg['task']} network: "
                         "expected the same task")
    # the space is built before the data, and again only if the data changes the classes (the seeded runs'
    # random stream depends on it)
    space = HRNASSpace(cfg) if build_space else None
    datamodule = spec.datamodule(c, input_hw(cfg))
    outputs = spec.outputs(datamodule)
    if outputs and outputs != cfg["num_classes"]:
        overrides["num_classes"] = outputs
        cfg = resolve_config(c.model.preset, **overrides)
        space = HRNASSpace(cfg) if build_space else None
    return spec, cfg, datamodule, space


def main(argv: list[str] | None = None) -> dict[str, Any]:
    c = parse_config(argv)
    check_config(c)
    set_threads(c.threads)
    quiet()
    seed_everything(c.seed)
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.config import to_yaml
    from retia.results import RunDir
    from retia.spaces.hrnas import count_macs, to_best_model, tokens_list
    from retia.strategies.hrnas_shrinking import ProgressiveShrinkingStrategy
    from retia.weights import save_weights

    spec, cfg, datamodule, space = build_task(c)

    # Files are written by the global rank 0 only (under DDP every rank runs this whole function, the NNI experiment
    # included): the run directory is opened at the first epoch record, which the callback gives rank 0 alone.
    out = Path(c.output)
    run: RunDir | None = None

    def run_dir() -> RunDir:
        nonlocal run
        if run is None:
            run = RunDir(out)
            (out / "config.yaml").write_text(to_yaml(c))
        return run

    def on_epoch(rec):
        run_dir().log_trial({"epoch": rec.epoch, "macs": rec.macs, "params": rec.params, "shrunk": rec.shrunk,
                             spec.metric: 100 * rec.metrics.get(spec.monitor, float("nan")),
                             "seconds": round(rec.seconds, 2)})

    s = c.search
    strategy = ProgressiveShrinkingStrategy(
        monitor=spec.monitor, rho=s.rho, epoch_free=s.epoch_free, epoch_warmup=s.epoch_warmup,
        threshold=s.threshold, interval=s.interval, min_delta_macs=s.min_delta_macs, tokens=s.tokens,
        on_epoch=on_epoch, ema_decay=c.train.ema_decay, bn_recalibration_batches=s.bn_recalibration_batches)
    evaluator = spec.evaluator(c, datamodule, cfg, out / "logs")
    experiment = NasExperiment(space, evaluator, strategy)
    # NNI's own bookkeeping starts before Lightning knows the rank: the launcher's environment tells; the other
    # ranks keep theirs in a scratch folder
    scratch = None if launched_as_rank_zero() else tempfile.mkdtemp(prefix="retia-hrnas-nni-")
    experiment.config.experiment_working_directory = str((out / "nni").resolve()) if scratch is None else scratch
    experiment.config.execution_engine = SequentialEngineConfig()
    experiment.config.model_format = RawModelFormatConfig()
    start = time.perf_counter()
    initial_macs = count_macs(cfg)
    try:
        experiment.run()
    finally:
        if scratch is not None:  # stop NNI now (it would at exit, writing into the scratch folder again), drop it
            try:
                experiment.stop()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start

    rank0 = evaluator.trainer.is_global_zero
    arch, net = strategy.arch, strategy.network
    macs = count_macs(cfg, arch)
    params = sum(p.numel() for p in net.parameters())
    # the epoch's validation ran before that epoch's shrink: measure the searched network itself (once: rank 0;
    # the other ranks hold the same network)
    value = spec.evaluate(net, datamodule) if rank0 else None
    last_val = strategy.final_metric
    m = spec.metric
    summary = {"arch": arch, "macs": macs, "supernet_macs": initial_macs, "params": params,
               m: None if value is None else 100 * value,
               f"{m}_before_last_shrink": None if last_val is None else 100 * last_val,
               "seconds": round(seconds, 1), "config": cfg, "task": spec.name, "metric": m,
               "ema_decay": c.train.ema_decay, "bn_recalibration_batches": strategy.callback.recalibrated}
    if not rank0:
        return summary
    run = run_dir()
    run.write_json("arch.json", summary)
    (out / "best_model.json").write_text(json.dumps(to_best_model(cfg, arch)) + "\n")
    run.write_json("tokens.json", tokens_list(cfg, arch))
    save_weights(net.state_dict(), out / "searched.safetensors", {"kind": SUBNET_KIND, "config": cfg, "arch": arch})
    plot_run(run, spec)
    print(f"searched: {macs / 1e6:.2f}M MACs (supernet {initial_macs / 1e6:.2f}M), {params / 1e6:.3f}M params, "
          f"{_metric_text(spec, summary[m])} in {seconds:.0f} s -> {out}")
    return summary


def launched_as_rank_zero() -> bool:
    """Whether the launcher's environment makes this process the global rank 0, before Lightning sets up the process
    group: torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or for the processes Lightning's own launcher starts (and
    the nodes of a manual multi-node run) ``NODE_RANK`` / ``LOCAL_RANK``, all 0 or unset. Only for what happens
    before training starts; afterwards ``trainer.is_global_zero`` decides."""
    names = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")
    return all(os.environ.get(name, "").strip() in ("", "0") for name in names)


def _metric_text(spec: TaskSpec, percent: float) -> str:
    name = {"top1": "top-1", "miou": "mIoU", "ap": "AP"}.get(spec.metric, spec.metric)
    return f"{name} {percent:.1f}%" if not math.isnan(percent) else f"{name} n/a"


def plot_run(run, spec: TaskSpec, macs: bool = True) -> None:
    """``macs.png`` (when ``macs``) and the task metric's plot (``spec.plot``) from the run's per-epoch rows."""
    from retia.results import _pyplot

    rows = [t for t in run.trials() if t.get("epoch") is not None]
    plt = _pyplot()
    plots = ([("macs", "macs.png", "MMACs", 1e6)] if macs else []) + [(spec.metric, spec.plot, spec.label, 1)]
    for key, name, label, scale in plots:
        pts = [(r["epoch"] + 1, r[key] / scale) for r in rows if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        run._save(fig, name)


if __name__ == "__main__":
    run_main(main)
