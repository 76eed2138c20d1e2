"""Train an AutoFormer supernet from scratch (NNI RandomOneShot: one random subnet per step, shared weights).

Writes ``<output>/last.safetensors`` and ``best.safetensors`` (+ JSON sidecars with the space config) after every
epoch, TensorBoard and CSV logs under ``<output>/logs``. Multi-GPU: ``--gpus 4 --strategy ddp``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from retia.cli import add_threads_arg, quiet, run_main, seed_everything, set_threads
from retia.experiments import autoformer_common as common
from retia.spaces.autoformer import PRESETS


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/autoformer-supernet", help="output directory (default: %(default)s)")
    p.add_argument("--preset", default="micro", choices=sorted(PRESETS), help="search space (default: %(default)s)")
    p.add_argument("--config", default=None, help="space config JSON instead of --preset")
    p.add_argument("--seed", type=int, default=0)
    common.add_data_args(p)
    common.add_trainer_args(p)
    add_threads_arg(p)
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    seed_everything(args.seed)
    config = common.supernet_config(args, num_classes=10)
    datamodule = common.datamodule_for(args, config)
    config["num_labels"] = datamodule.num_classes
    weights = common.train_supernet(config, datamodule, Path(args.output), args)
    print(f"supernet weights: {weights} (best epoch: {Path(args.output) / 'best.safetensors'})")
    return weights


if __name__ == "__main__":
    run_main(main)
