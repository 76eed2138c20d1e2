"""Train a ZenNet — a searched structure or a published one — with Zen-NAS's recipe (optionally distilled from a
teacher), on Lightning.

    python experiments/zennas_train.py                                     # ZenNet-0.5M on the embedded digits
    python experiments/zennas_train.py --arch runs/zennas-search/best_structure.txt --epochs 30
    python experiments/zennas_train.py --arch zennet_cifar10_model_size1M_res32 --datapath ~/data/cifar10 \\
        --epochs 1440 --devices 4 --strategy ddp                            # the original CIFAR recipe, 4 GPUs
    python experiments/zennas_train.py --arch best_structure.txt --datapath ~/imagenet --image-size 224 \\
        --teacher timm:tf_efficientnet_b3 --teacher-weights b3.safetensors --teacher-image-size 320 \\
        --weight-decay 4e-5 --epochs 480 --use-se                           # the original ImageNet recipe (distilled)

Defaults are the original scripts' (SGD + Nesterov, 0.1 per 256 images, 5 warm-up epochs, cosine to 0, label
smoothing, mixup, auto-augment, random erasing, weight decay 5e-4 (use 4e-5 for ImageNet), BN momentum 0.01, the
custom initialisation). Writes ``last.safetensors`` / ``best.safetensors`` (+ JSON with the structure string),
TensorBoard and CSV logs, and ``result.json`` to ``--output``.

Multi-GPU / multi-node (Lightning DDP replaces the original's apex / Horovod): ``--devices N --strategy ddp``
on one machine; on a cluster run one process per node with ``--num-nodes M`` under SLURM (``srun python
experiments/zennas_train.py --devices 8 --num-nodes 4 --strategy ddp ...`` in an sbatch script with
``--ntasks-per-node=8``) or ``torchrun``. ``--batch-size`` is per device; the learning rate scales with the total
batch (devices x nodes x batch), as in the original.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from retia.cli import add_threads_arg, positive_int, quiet, run_main, seed_everything, set_threads
from retia.errors import RetiaError


def _bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    dest = name.replace("-", "_")
    parser.add_argument(f"--{name}", dest=dest, action="store_true", default=default, help=f"{help} (default: "
                        f"{'on' if default else 'off'})")
    parser.add_argument(f"--no-{name}", dest=dest, action="store_false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="zennet_cifar10_model_size05M_res32",
                   help="a ZenNet name, a structure string, a file holding one (best_structure.txt) or a search's "
                        "best.json")
    p.add_argument("--output", default="runs/zennas-train", help="output directory (default: %(default)s)")
    p.add_argument("--datapath", default=None, help="ImageFolder (train/ val/) or CIFAR directory; default: digits")
    p.add_argument("--num-classes", type=positive_int, default=None, help="default: the data's")
    p.add_argument("--image-size", type=positive_int, default=None, help="default: the arch's resolution, else 32")
    p.add_argument("--init-weights", default=None,
                   help="start from these weights (official .pth or .safetensors; another head size is re-initialised)")
    p.add_argument("--use-se", action="store_true", help="SE gates in the residual blocks")
    p.add_argument("--dropout", type=float, default=None)
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=positive_int, default=3)
    g.add_argument("--warmup", type=float, default=None, help="warm-up epochs (default 5, fewer when --epochs <= 5)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="per device")
    g.add_argument("--lr-per-256", type=float, default=0.1)
    g.add_argument("--target-lr-per-256", type=float, default=0.0)
    g.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --lr-per-256)")
    g.add_argument("--lr-mode", choices=["cosine", "linear"], default="cosine")
    g.add_argument("--momentum", type=float, default=0.9)
    _bool(g, "nesterov", True, "Nesterov momentum")
    g.add_argument("--weight-decay", "--wd", type=float, default=5e-4, dest="weight_decay")
    _bool(g, "label-smoothing", True, "label smoothing 0.1")
    _bool(g, "mixup", True, "mixup (alpha 0.2)")
    _bool(g, "auto-augment", True, "AutoAugment")
    _bool(g, "random-erase", True, "random erasing")
    g.add_argument("--bn-momentum", type=float, default=0.01)
    g.add_argument("--weight-init", choices=["custom", "none"], default="custom")
    g = p.add_argument_group("distillation (ts_train_image_classification.py)")
    g.add_argument("--teacher", default=None,
                   help="a ZenNet name / structure / file, or timm:<model name> (e.g. timm:tf_efficientnet_b3)")
    g.add_argument("--teacher-weights", default=None, help="the teacher's weights (.pth or .safetensors)")
    g.add_argument("--teacher-image-size", type=positive_int, default=None)
    g.add_argument("--teacher-feature-weight", type=float, default=1.0)
    g.add_argument("--teacher-logit-weight", type=float, default=1.0)
    g.add_argument("--target-downsample-ratio", type=positive_int, default=16)
    g.add_argument("--ts-proj-bn", action="store_true", help="BN after the projections (the scripts: none)")
    g.add_argument("--ts-proj-relu", action="store_true", help="ReLU after the projections (the scripts: none)")
    g.add_argument("--ts-clip", type=float, default=None)
    g = p.add_argument_group("devices (Lightning)")
    g.add_argument("--devices", default="auto", help="a count or 'auto'")
    g.add_argument("--num-nodes", type=positive_int, default=1)
    g.add_argument("--strategy", default="auto", help="e.g. ddp")
    g.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    g.add_argument("--precision", default=None, help="e.g. 16-mixed, bf16-mixed")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across devices")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--limit-train-batches", type=float, default=None, help="for quick runs: a fraction or a count")
    g.add_argument("--limit-val-batches", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    return p


def resolve_structure(arch: str) -> dict[str, Any]:
    """``{"structure", "name", "resolution", "num_classes", "use_se"}`` of a zoo name, string, file or best.json."""
    from retia.spaces import zennas

    path = Path(arch).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RetiaError(f"--arch {arch!r} is not JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("structure"), str):
            raise RetiaError(f"--arch {arch!r}: expected a JSON object with a 'structure' string (a search's best.json)")
        return {"structure": data["structure"], "name": None, "resolution": None, "num_classes": None,
                "use_se": False}
    return zennas.resolve_arch(arch)


def _devices(value: str):
    return int(value) if str(value).isdigit() else value


def load_teacher(spec: str, weights: str | None, num_classes: int):
    from torch import nn

    from retia.evaluators.zennas_training import TimmStageAdapter
    from retia.spaces import zennas

    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:"):]
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except Exception as err:  # timm raises RuntimeError for unknown names
            raise RetiaError(f"--teacher {spec!r}: {str(err).splitlines()[0]}") from None
        if weights:
            from retia.evaluators.classification import load_matching

            load_matching(model, weights)
        return TimmStageAdapter(model)
    arch = resolve_structure(spec)
    model = zennas.build(arch["structure"], num_classes, use_se=bool(arch.get("use_se")))
    if weights:
        zennas.load_official_weights(model, weights)
    if not isinstance(model, nn.Module):
        raise RetiaError(f"--teacher {spec!r} does not build a module")
    return model


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    seed_everything(args.seed)
    from retia.evaluators.classification import SafetensorsCheckpoint
    from retia.evaluators.zennas_training import zennas_datamodule, zennas_training_evaluator
    from retia.spaces import zennas

    arch = resolve_structure(args.arch)
    image_size = args.image_size or arch.get("resolution") or 32
    teacher_size = args.teacher_image_size or image_size
    datamodule = zennas_datamodule(args.datapath, image_size=max(image_size, teacher_size),
                                   batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                                   auto_augment=args.auto_augment, random_erase=args.random_erase)
    num_classes = args.num_classes or datamodule.num_classes
    if args.num_classes and args.num_classes != datamodule.num_classes:
        raise RetiaError(f"--num-classes {args.num_classes}: the data has {datamodule.num_classes} classes")
    use_se = args.use_se or bool(arch.get("use_se"))
    model = zennas.build(arch["structure"], num_classes, use_se=use_se, dropout=args.dropout)
    warmup = args.warmup if args.warmup is not None else min(5.0, args.epochs / 2)
    if warmup >= args.epochs:
        raise RetiaError(f"--warmup {warmup:g} must be smaller than --epochs {args.epochs}")
    teacher = load_teacher(args.teacher, args.teacher_weights, num_classes) if args.teacher else None
    out = Path(args.output)
    meta = {"kind": "zennet", "structure": model.structure, "num_classes": num_classes, "use_se": use_se,
            "resolution": image_size, "name": arch.get("name")}
    checkpoint = SafetensorsCheckpoint(out, lambda: model, meta)
    evaluator = zennas_training_evaluator(
        datamodule, num_classes=num_classes, max_epochs=args.epochs, log_dir=out / "logs", callbacks=[checkpoint],
        accelerator=args.accelerator, devices=_devices(args.devices), num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, sync_batchnorm=args.sync_bn,
        limit_train_batches=_limit(args.limit_train_batches), limit_val_batches=_limit(args.limit_val_batches),
        lr_per_256=args.lr_per_256, target_lr_per_256=args.target_lr_per_256, lr=args.lr, warmup_epochs=warmup,
        lr_mode=args.lr_mode, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, mixup=args.mixup, bn_momentum=args.bn_momentum,
        weight_init=args.weight_init, teacher=teacher, teacher_image_size=teacher_size, student_image_size=image_size,
        teacher_feature_weight=args.teacher_feature_weight, teacher_logit_weight=args.teacher_logit_weight,
        target_downsample_ratio=args.target_downsample_ratio, ts_proj_bn=args.ts_proj_bn,
        ts_proj_relu=args.ts_proj_relu, ts_clip=args.ts_clip, seed=args.seed, init_weights=args.init_weights)
    evaluator.evaluate(model)
    trainer = evaluator.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
    result = {"structure": model.structure, "epochs": args.epochs, "num_classes": num_classes,
              "val_top1": 100 * metrics.get("val_top1", float("nan")),
              "val_top5": 100 * metrics.get("val_top5", float("nan")), "best_top1": 100 * checkpoint.best,
              "weights": str(out / "best.safetensors")}
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"val top-1: {result['val_top1']:.2f}%  top-5: {result['val_top5']:.2f}%  (best {result['best_top1']:.2f}%)")
        print(f"weights: {out}/best.safetensors, last.safetensors (+ .json with the structure)")
    return result


def _limit(value: float | None):
    if value is None:
        return None
    return int(value) if float(value).is_integer() and value >= 1 else value


if __name__ == "__main__":
    run_main(main)
