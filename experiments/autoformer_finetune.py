"""Fine-tune a trained AutoFormer supernet on another dataset (e.g. ImageNet supernet → CIFAR-10).

The pretrained weights (``--weights``, a retia supernet file) are loaded into the supernet before training;
a classifier head of another size is re-initialised. Outputs as in autoformer_scratch.py.
"""
from __future__ import annotations

from pathlib import Path

from retia.cli import quiet, run_main, seed_everything, set_threads
from retia.experiments import autoformer_common as common
from retia.experiments.autoformer_scratch import build_parser
from retia.weights import load_meta


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser(__doc__)
    parser.add_argument("--weights", required=True, help="pretrained supernet (.safetensors with JSON sidecar)")
    parser.set_defaults(output="runs/autoformer-finetune", epochs=100, warmup=5, learning_rate=5e-4)
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    seed_everything(args.seed)
    common.supernet_from_weights(args.weights)  # validates the file and its sidecar
    config = dict(load_meta(args.weights)["config"])
    datamodule = common.datamodule_for(args, config)
    config["num_labels"] = datamodule.num_classes
    weights = common.train_supernet(config, datamodule, Path(args.output), args, init_weights=args.weights)
    print(f"fine-tuned supernet weights: {weights}")
    return weights


if __name__ == "__main__":
    run_main(main)
