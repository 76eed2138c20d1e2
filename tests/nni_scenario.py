"""NAS experiments driven by tests/test_nni_frontends.py in a subprocess (run as a script: its functions then reach
NNI's trial processes by value). Not a test module itself.

    python tests/nni_scenario.py --mode seq|ts|ts-weights|ts-lightning --id ID --workdir DIR --trials N [--port P]
                                 [--resume]

Prints ``SAMPLES <json>`` (the archs the engine ran in this process) and ``DB <path>`` at the end.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import retia  # noqa: F401  (compat fixes)
import nni
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.experiment import NasExperiment
from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig
from nni.nas.strategy import Random

from retia.experiments.nni_frontend import (SubnetFromWeights, finish_for_nnictl, record_for_nnictl,
                                            use_training_service)
from retia.spaces.autoformer import SUPERNET_KIND, AutoformerSpace


def score(model) -> None:
    """Cheap, deterministic metric: millions of parameters (intermediate: half of it)."""
    n = sum(p.numel() for p in model.parameters())
    nni.report_intermediate_result(n / 2e6)
    nni.report_final_result(n / 1e6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    work = Path(args.workdir)
    config = AutoformerSpace.config("micro")
    space = AutoformerSpace.from_config(config)
    evaluator = FunctionalEvaluator(score)
    if args.mode == "ts-weights":
        import torch

        from retia.data import DigitsDataModule
        from retia.evaluators.weight_sharing import SubnetScorer
        from retia.results import RunDir
        from retia.weights import save_weights

        weights = work / "supernet.safetensors"
        if not weights.exists():
            torch.manual_seed(0)
            save_weights(AutoformerSpace.build_supernet(config).state_dict(), weights,
                         {"kind": SUPERNET_KIND, "config": config})
        space = AutoformerSpace.load_supernet(str(weights))
        scorer = SubnetScorer(RunDir(work / "run", resume=(work / "run" / "trials.jsonl").exists()), DigitsDataModule(image_size=32).val_dataloader,
                              (1, 3, 32, 32))
        evaluator = FunctionalEvaluator(SubnetFromWeights(
            scorer, functools.partial(AutoformerSpace.load_subnet, weights=str(weights))))
    elif args.mode == "ts-lightning":
        from retia.data import DigitsDataModule
        from retia.evaluators.classification import classification_evaluator

        evaluator = classification_evaluator(nni.trace(DigitsDataModule)(image_size=32), num_classes=10,
                                             max_epochs=1, log_dir=str(work / "logs"), limit_train_batches=2,
                                             enable_progress_bar=False, mixup=0.0, cutmix=0.0, accelerator="cpu")
    exp = NasExperiment(space, evaluator, Random(seed=0), id=args.id)
    exp.config.max_trial_number = args.trials
    exp.config.experiment_working_directory = str(work / "nni")
    if args.mode.startswith("ts"):
        use_training_service(exp, concurrency=1)
    else:
        exp.config.execution_engine = SequentialEngineConfig()
        exp.config.model_format = RawModelFormatConfig()
    record = record_for_nnictl(exp)
    ran = []
    try:
        if args.resume:
            exp.resume(port=args.port)
        else:
            exp.run(port=args.port)
    finally:
        if exp._engine is not None and not args.mode.startswith("ts"):
            ran = [dict(m.sample) for m in exp._engine.list_models()]
        exp.stop()
        print("SAMPLES", json.dumps(ran), flush=True)
        print("DB", finish_for_nnictl(exp, record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
