"""The AutoFormer pipeline shared by the entry points: supernet training (scratch / fine-tune) and the search."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch

from retia.cli import positive_int
from retia.data import build_datamodule
from retia.errors import RetiaError
from retia.evaluators.classification import SafetensorsCheckpoint, classification_evaluator
from nni.nas.evaluator import FunctionalEvaluator

from retia.evaluators.weight_sharing import SubnetScorer
from retia.results import RunDir
from retia.spaces.autoformer import SUBNET_KIND, SUPERNET_KIND, AutoformerSpace
from retia.weights import load_meta, save_weights

_logger = logging.getLogger("retia.autoformer")


def parse_count(text: str) -> float:
    """``'5.5M'``, ``'200k'``, ``'5e6'`` → a number (argparse type for parameter limits)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count such as 5.5M, 200k or 5e6")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]


def add_data_args(parser: argparse.ArgumentParser, image_size: int | None = None) -> None:
    parser.add_argument("--datapath", default=None,
                        help="ImageFolder (train/ val/) or CIFAR directory; default: the embedded digits")
    parser.add_argument("--batch-size", "--batch_size", type=positive_int, default=64, dest="batch_size")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--image-size", type=positive_int, default=image_size,
                        help="input resolution (default: the preset's img_size)")


def add_trainer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--warmup", type=float, default=2, help="linear warmup epochs")
    parser.add_argument("--learning-rate", "--learning_rate", type=float, default=5e-4, dest="learning_rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 disables)")
    parser.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 disables)")
    parser.add_argument("--drop-path", type=float, default=None, help="drop-path rate (default: the preset's)")
    parser.add_argument("--gpus", "--devices", dest="devices", default="auto",
                        help="Lightning devices: a count or 'auto' (CPU when no GPU)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--strategy", dest="dist_strategy", default="auto",
                        help="Lightning strategy, e.g. ddp for multi-GPU / multi-node")
    parser.add_argument("--precision", default=None, help="Lightning precision, e.g. 16-mixed or bf16-mixed")


def datamodule_for(args: argparse.Namespace, config: dict[str, Any]):
    size = args.image_size or config.get("img_size", 224)
    if args.image_size and args.image_size != config.get("img_size", 224):
        raise RetiaError(f"--image-size {args.image_size} differs from the space's img_size "
                         f"{config.get('img_size', 224)}: set both through the preset / config")
    dm = build_datamodule(args.datapath, image_size=size, batch_size=args.batch_size, num_workers=args.num_workers,
                          seed=getattr(args, "seed", 0))
    return dm


def _devices(value: str):
    return int(value) if str(value).isdigit() else value


def train_supernet(config: dict[str, Any], datamodule, out_dir: Path, args: argparse.Namespace,
                   init_weights: str | None = None) -> Path:
    """Train the weight-sharing supernet of ``config`` with NNI's ``RandomOneShot``; returns its weights file.

    ``init_weights`` (a supernet weights file) fine-tunes instead of training from scratch: the Lightning module
    loads it into the supernet when fitting starts (as NNI's example does); a classifier head of another size keeps
    its fresh initialisation.
    """
    from nni.nas.experiment import NasExperiment
    from nni.nas.strategy import RandomOneShot

    space = AutoformerSpace.from_config(config)
    meta = {"kind": SUPERNET_KIND, "config": config}
    strategy = RandomOneShot()
    callback = SafetensorsCheckpoint(out_dir, lambda: space, meta)
    evaluator = classification_evaluator(
        datamodule, num_classes=config["num_labels"], max_epochs=args.epochs, log_dir=out_dir / "logs",
        callbacks=[callback], accelerator=args.accelerator, devices=_devices(args.devices),
        strategy=args.dist_strategy, precision=args.precision, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, init_weights=init_weights)
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = str((out_dir / "nni").resolve())
    experiment.run()
    weights = out_dir / "last.safetensors"
    save_weights(space.state_dict(), weights, dict(meta, finished=True))
    return weights


def search(supernet: AutoformerSpace, config: dict[str, Any], weights: str, datamodule, run: RunDir,
           strategy_name: str, args: argparse.Namespace, resume: bool,
           progress: Callable[[list[dict]], None] | None = None) -> None:
    """Evolution / random search over subnets inheriting ``supernet``'s weights, as an NNI experiment.

    Sequential engine (default): trials run in this process on ``supernet``. With ``args.port``: NNI's
    training-service engine serves the web UI and each trial loads its subnet from the ``weights`` file.
    ``progress(trials)`` is called in this process after every finished trial.
    """
    import functools

    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.experiments.nni_frontend import (SubnetFromWeights, finish_for_nnictl, record_for_nnictl,
                                                use_training_service)
    from retia.strategies import ConstrainedEvolution, ConstrainedRandom, ParamLimits

    constraint = None
    if args.min_params is not None or args.max_params is not None:
        constraint = ParamLimits(functools.partial(AutoformerSpace.count_params, config=config),
                                 args.min_params, args.max_params)
    size = config.get("img_size", 224)
    port = getattr(args, "port", None)
    scorer = SubnetScorer(run, datamodule.val_dataloader, (1, 3, size, size), device=args.device,
                          param_counter=functools.partial(AutoformerSpace.count_params, config=config),
                          flops_counter=functools.partial(AutoformerSpace.count_flops, config=config))
    if port:  # trials are subprocesses: they get the subnet from the supernet file, not the object
        evaluator = FunctionalEvaluator(SubnetFromWeights(
            scorer, functools.partial(AutoformerSpace.load_subnet, weights=weights, config=config)))
    else:
        datamodule.setup("validate")
        evaluator = scorer.evaluator()
    if strategy_name == "evolution":
        strategy = ConstrainedEvolution(population_size=args.evolution_population_size,
                                        sample_size=args.evolution_sample_size,
                                        mutation_prob=args.evolution_mutation_prob, crossover=args.evolution_crossover,
                                        seed=args.seed, constraint=constraint)
    else:
        strategy = ConstrainedRandom(seed=args.seed, constraint=constraint)
    state = run.read_json("run.json") if (run.path / "run.json").exists() else {}
    experiment = NasExperiment(supernet, evaluator, strategy, id=state.get("experiment_id") if resume else None)
    experiment.config.max_trial_number = args.evolution_cycles
    experiment.config.experiment_working_directory = str((run.path / "nni").resolve())
    if port:
        use_training_service(experiment, concurrency=args.concurrency)
    else:
        experiment.config.execution_engine = SequentialEngineConfig()
        experiment.config.model_format = RawModelFormatConfig()
    strategy.trial_end_hooks.append(lambda model: experiment.save_checkpoint())
    if progress is not None:
        strategy.trial_end_hooks.append(lambda model: progress(run.trials()))
    run.write_json("run.json", dict(state, experiment_id=experiment.id, strategy=strategy_name))
    record = record_for_nnictl(experiment)  # so `nnictl view <id>` shows the search afterwards
    if resume and (run.path / "nni" / experiment.id / "checkpoint").exists():
        experiment.resume(port=port or 8080)
    else:
        experiment.run(port=port or 8080)
    experiment.stop()
    finish_for_nnictl(experiment, record)


def export_best(run: RunDir, supernet: AutoformerSpace, config: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``best.json``, the best subnet's weights, and the Pareto / progress plots; returns the best trial."""
    best = run.best("top1")
    if best is None:
        return None
    run.write_json("best.json", best)
    subnet = supernet.freeze(supernet.complete_arch(best["arch"]))
    save_weights(subnet.state_dict(), run.path / "best_subnet.safetensors",
                 {"kind": SUBNET_KIND, "config": config, "arch": best["arch"], "top1": best["top1"]})
    run.plot_pareto("params", "top1", "pareto.png", xlabel="parameters (M)", ylabel="top-1 (%)", x_scale=1e6)
    run.plot_progress("top1", "progress.png", ylabel="top-1 (%)")
    return best


def supernet_config(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """The space config: the preset with this run's class count and drop-path rate (or a config JSON)."""
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise RetiaError(f"--config {args.config!r} does not exist")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RetiaError(f"--config {args.config!r} is not JSON ({exc})") from None
    return AutoformerSpace.config(args.preset, num_labels=num_classes, drop_path_rate=getattr(args, "drop_path", None))


def supernet_from_weights(weights: str, num_classes: int | None = None) -> tuple[AutoformerSpace, dict[str, Any]]:
    if not Path(weights).is_file():
        raise RetiaError(f"--weights {weights!r} does not exist")
    meta = load_meta(weights)
    if meta is None or meta.get("kind") != SUPERNET_KIND:
        raise RetiaError(f"--weights {weights!r}: expected a retia supernet file (safetensors with a JSON sidecar "
                         f"of kind {SUPERNET_KIND}); convert official checkpoints with convert/autoformer.py")
    config = meta["config"]
    if num_classes is not None and config.get("num_labels") != num_classes:
        raise RetiaError(f"--weights {weights!r} classify {config.get('num_labels')} classes but the data has "
                         f"{num_classes}: fine-tune first (experiments/autoformer_finetune.py)")
    return AutoformerSpace.load_supernet(weights), config


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
