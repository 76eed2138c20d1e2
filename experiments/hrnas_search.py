"""HR-NAS search by progressive shrinking (classification), as an NNI experiment.

``python experiments/hrnas_search.py`` with no arguments: the ``tiny`` supernet on the embedded digits (32x32),
a CPU-sized run of a few minutes. Writes to ``--output`` (default ``runs/hrnas-search``):

* ``arch.json`` — the searched arch dict (+ ``macs``, ``params``, ``config``), ``best_model.json`` — the same arch in
  the original's ``inverted_residual_setting`` format, ``tokens.json`` — tokens per transformer (block order);
* ``searched.safetensors`` (+ ``.json`` sidecar: kind, config, arch) — the shrunk network's weights;
* ``trials.jsonl`` / ``.csv`` / ``.json`` — one row per epoch (MACs, parameters, validation top-1, whether it
  shrank), ``macs.png`` (MACs vs epoch) and ``accuracy.png`` (validation top-1 vs epoch);
* ``logs/`` (TensorBoard + CSV) and ``nni/`` (NNI's experiment directory).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `retia` importable from a source checkout as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retia.cli import add_threads_arg, quiet, run_main, seed_everything, set_threads  # noqa: E402
from retia.errors import RetiaError  # noqa: E402

SUBNET_KIND = "hrnas-searched"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    quiet()
    seed_everything(args.seed)
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.data import build_datamodule
    from retia.evaluators.classification import classification_evaluator
    from retia.results import RunDir
    from retia.spaces.hrnas import HRNASSpace, count_macs, to_best_model, tokens_list
    from retia.strategies.hrnas_shrinking import ProgressiveShrinkingStrategy
    from retia.weights import save_weights

    overrides: dict[str, Any] = {}
    if args.width_mult is not None:
        overrides["width_mult"] = args.width_mult
    if args.image_size is not None:
        overrides["input_size"] = args.image_size
    space = HRNASSpace(args.preset, **overrides)
    cfg = space.config
    size = cfg["input_size"] if isinstance(cfg["input_size"], int) else cfg["input_size"][0]
    datamodule = build_datamodule(args.datapath, image_size=size, batch_size=args.batch_size)
    num_classes = getattr(datamodule, "num_classes", None)
    if num_classes and num_classes != cfg["num_classes"]:
        space = HRNASSpace(args.preset, **dict(overrides, num_classes=num_classes))
        cfg = space.config
    if args.epochs < 1:
        raise RetiaError(f"--epochs {args.epochs}: expected >= 1")

    out = Path(args.output)
    run = RunDir(out)

    def on_epoch(rec):
        run.log_trial({"epoch": rec.epoch, "macs": rec.macs, "params": rec.params, "shrunk": rec.shrunk,
                       "top1": 100 * rec.metrics.get("val_top1", float("nan")), "seconds": round(rec.seconds, 2)})

    strategy = ProgressiveShrinkingStrategy(
        rho=args.rho, epoch_free=args.epoch_free, epoch_warmup=args.epoch_warmup, threshold=args.threshold,
        interval=args.interval, min_delta_macs=args.min_delta_macs, tokens=not args.no_tokens, on_epoch=on_epoch)
    evaluator = classification_evaluator(
        datamodule, num_classes=cfg["num_classes"], max_epochs=args.epochs, log_dir=out / "logs",
        accelerator=args.accelerator, limit_train_batches=args.limit_train_batches, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup, mixup=0.0, cutmix=0.0, report_to_nni=False)
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
