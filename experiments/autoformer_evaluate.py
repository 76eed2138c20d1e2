"""Evaluate an AutoFormer subnet on a validation set: top-1, top-5, parameters, FLOPs.

The model is the paper's searched subnet (``--name tiny|small|base``), an arch JSON (``--arch``), or the arch
stored beside the weights (a retia subnet file such as a search's ``best_subnet.safetensors``). ``--weights`` is
a retia subnet file, or a supernet file to slice the subnet from.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from retia.cli import add_threads_arg, quiet, run_main, set_threads
from retia.errors import RetiaError
from retia.evaluators.weight_sharing import accuracy
from retia.experiments import autoformer_common as common
from retia.spaces.autoformer import SUBNET_KIND, AutoformerSpace
from retia.weights import load_meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="tiny | small | base (or autoformer-tiny ...): the paper's subnet")
    p.add_argument("--arch", default=None, help="arch JSON file (labels embed_dim, depth, mlp_ratio_i, num_head_i)")
    p.add_argument("--weights", default=None, help="subnet or supernet weights (.safetensors + .json)")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file")
    p.add_argument("--device", default=None)
    common.add_data_args(p)
    add_threads_arg(p)
    return p


def resolve(args) -> tuple[dict, dict]:
    """``(arch, config)`` from --name / --arch / the weights' sidecar."""
    if args.weights and not Path(args.weights).is_file():
        raise RetiaError(f"--weights {args.weights!r} does not exist")
    meta = load_meta(args.weights) if args.weights else None
    if args.weights and meta is None:
        raise RetiaError(f"--weights {args.weights!r}: no JSON sidecar; convert official files with "
                         f"convert/autoformer.py first")
    if args.name:
        name = args.name if args.name.startswith("autoformer-") else f"autoformer-{args.name}"
        preset, arch = AutoformerSpace.searched_arch(name)
        config = meta["config"] if meta else AutoformerSpace.config(preset)
    elif args.arch:
        path = Path(args.arch)
        if not path.is_file():
            raise RetiaError(f"--arch {args.arch!r} does not exist")
        arch = json.loads(path.read_text())
        arch = arch.get("arch", arch)
        if meta is None:
            raise RetiaError("--arch needs --weights (their sidecar holds the space config)")
        config = meta["config"]
    elif meta and meta.get("kind") == SUBNET_KIND:
        arch, config = meta["arch"], meta["config"]
    else:
        raise RetiaError("give --name, --arch, or --weights of a subnet file (its sidecar names the arch)")
    return arch, config


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    arch, config = resolve(args)
    if args.weights:
        model = AutoformerSpace.load_subnet(arch, weights=args.weights, config=config)
    else:
        print("warning: no --weights given: evaluating a randomly initialised model")
        model = AutoformerSpace.build_subnet(arch, config)
    datamodule = common.datamodule_for(args, config)
    if datamodule.num_classes != config["num_labels"]:
        raise RetiaError(f"the model classifies {config['num_labels']} classes, the data at "
                         f"{args.datapath or 'digits'!r} has {datamodule.num_classes}")
    datamodule.setup("validate")
    full = AutoformerSpace.from_config(config).complete_arch(arch)
    metrics = accuracy(model, datamodule.val_dataloader(), args.device or common.default_device())
    result = {"arch": full, **metrics, "params": AutoformerSpace.count_params(full, config),
              "flops": AutoformerSpace.count_flops(full, config)}
    print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  params {result['params'] / 1e6:.2f}M  "
          f"FLOPs {result['flops'] / 1e9:.3f}G")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
