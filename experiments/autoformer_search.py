"""AutoFormer search: subnets inherit a trained supernet's weights and are ranked by validation top-1.

With no arguments this is retia's main job: it trains a ``micro`` supernet on the embedded digits (a few minutes
on a CPU), runs an evolution search over its subnets as an NNI experiment, prints the best arch and its accuracy
and writes the run directory (trials CSV/JSON, best.json, best_subnet.safetensors, pareto.png, progress.png).

With ``--weights`` (a retia supernet file) and ``--datapath`` it searches that supernet on a real dataset; as in
NNI's AutoFormer example, that is random search unless ``--evolution`` is given.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from retia.cli import add_threads_arg, positive_int, quiet, run_main, seed_everything, set_threads
from retia.errors import RetiaError
from retia.experiments import autoformer_common as common
from retia.results import RunDir
from retia.spaces.autoformer import PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/autoformer-search", help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the search in --output where it stopped")
    p.add_argument("--weights", default=None, help="trained supernet (.safetensors + .json); default: train one")
    p.add_argument("--preset", default="micro", choices=sorted(PRESETS), help="space to train when no --weights")
    p.add_argument("--config", default=None, help="space config JSON instead of --preset")
    common.add_data_args(p)
    common.add_trainer_args(p)
    p.set_defaults(epochs=60)
    g = p.add_argument_group("search")
    g.add_argument("--evolution", action="store_true", help="regularized evolution (default unless --weights)")
    g.add_argument("--random", action="store_true", help="random search (default with --weights)")
    g.add_argument("--evolution-sample-size", type=positive_int, default=10, help="tournament size")
    g.add_argument("--evolution-population-size", type=positive_int, default=30, help="population size")
    g.add_argument("--evolution-cycles", type=positive_int, default=150,
                   help="number of subnets evaluated (trials), the first population included")
    g.add_argument("--evolution-mutation-prob", type=float, default=0.2, help="per-label mutation probability")
    g.add_argument("--evolution-crossover", action="store_true", help="cross two parents before mutating")
    g.add_argument("--min-params", type=common.parse_count, default=None, help="e.g. 5M: smaller subnets rejected")
    g.add_argument("--max-params", type=common.parse_count, default=None, help="e.g. 6M: larger subnets rejected")
    g.add_argument("--device", default=None, help="device for subnet evaluation (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--port", type=int, default=None,
                   help="serve NNI's web UI on this port (trials run through NNI's training service)")
    g.add_argument("--concurrency", type=positive_int, default=1, help="parallel trials with --port")
    add_threads_arg(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    logging.getLogger("nni").setLevel(logging.WARNING)
    if args.evolution and args.random:
        raise RetiaError("--evolution and --random exclude each other")
    strategy = "random" if args.random or (args.weights and not args.evolution) else "evolution"
    args.device = args.device or common.default_device()
    seed_everything(args.seed)
    run = RunDir(args.output, resume=args.resume)
    state = run.read_json("run.json") if args.resume and (run.path / "run.json").exists() else {}
    if args.resume and state.get("strategy") and state["strategy"] != strategy:
        raise RetiaError(f"--resume: {args.output!r} ran a {state['strategy']} search, not {strategy}")

    if args.weights:
        supernet, config = common.supernet_from_weights(args.weights)
        datamodule = common.datamodule_for(args, config)
        weights = args.weights
    else:
        config = common.supernet_config(args, num_classes=10)
        datamodule = common.datamodule_for(args, config)
        config["num_labels"] = datamodule.num_classes
        weights = state.get("supernet")
        if weights is None or not Path(weights).is_file():
            print(f"[1/2] training the {args.preset} supernet for {args.epochs} epochs (RandomOneShot) ...", flush=True)
            weights = str(common.train_supernet(config, datamodule, run.path / "supernet", args))
            run.write_json("run.json", dict(state, supernet=weights))
            state = run.read_json("run.json")
        supernet, config = common.supernet_from_weights(weights)

    total = args.evolution_cycles
    done = len(run.trials())
    print(f"[2/2] {strategy} search: {total} subnets ({done} already done) ...", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=min(done, total), desc=f"{strategy} search", unit="trial", file=sys.stdout)

    def progress(trials: list[dict]) -> None:
        if not trials:
            return
        last, best = trials[-1], max(t["top1"] for t in trials)
        bar.update(max(0, min(len(trials), total) - bar.n))
        bar.set_postfix(top1=f"{last['top1']:.1f}", best=f"{best:.1f}", params=f"{last['params'] / 1e6:.2f}M")

    common.search(supernet, config, weights, datamodule, run, strategy, args, resume=args.resume, progress=progress)
    bar.close()
    top = common.export_best(run, supernet, config)
    if top is None:
        raise RetiaError("the search evaluated no subnet (are --min-params / --max-params satisfiable?)")
    print(f"best arch: {top['arch']}")
    print(f"best top-1: {top['top1']:.2f}%  top-5: {top['top5']:.2f}%  params: {top['params'] / 1e6:.3f}M  "
          f"FLOPs: {top['flops'] / 1e6:.1f}M")
    print(f"results in {run.path}/: trials.csv trials.json best.json best_subnet.safetensors pareto.png progress.png")
    return top


if __name__ == "__main__":
    run_main(main)
