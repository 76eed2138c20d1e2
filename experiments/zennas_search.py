"""Zen-NAS search: zero-shot evolution of structure strings under parameter / FLOPs / latency budgets, on NNI.

With no arguments it runs a CIFAR-style search with the paper's parameter budget (params <= 1M, 32x32 inputs,
100 classes, batch 64, Zen-score, max 18 layers, the original's fixed initial structure and mutation) sized for a
few minutes on a CPU (population 64, 1200 iterations), and writes the run directory:

    trials.jsonl / trials.csv / trials.json   every scored candidate (structure, score, params, FLOPs, layers, ...)
    best_structure.txt, best.json             the best structure and its record
    search.json                               settings, counts (scored / rejected by reason), timing
    score_vs_iteration.png, score_vs_params.png
    search_state.json                         the checkpoint --resume continues from (rewritten every trial)

``--config NAME`` loads the settings of one of the original scripts (``experiments/configs/zennas/NAME.yaml``:
cifar_params1M_{zen,gradnorm,naswot,synflow,te_nas,flops,params,random}, cifar_params2M_zen,
imagenet_flops{400,600,800}M, imagenet_latency{01,02,03,05,08,12}ms) or a YAML/JSON file; flags override it.
``--concurrency K`` (or ``--port``) scores K candidates at once in NNI trial processes (NNI's training-service
engine and web UI); the default runs them in this process (NNI's sequential engine).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from retia.cli import positive_int, quiet, run_main, set_threads
from retia.errors import RetiaError
from retia.results import RunDir

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "zennas"

#: every setting and its default under a config (a config names its own budgets)
BASE: dict[str, Any] = {
    "proxy": "zen", "space": "XXBL", "initial": "cifar", "budget_params": None, "budget_flops": None,
    "budget_latency": None, "max_layers": None, "batch_size": 64, "resolution": 32, "num_classes": 100,
    "population_size": 512, "max_iterations": 480000, "fix_initialize": True, "origin": True, "dedup": True,
    "gamma": 1e-2, "seed": 0, "latency_batch_size": 64, "latency_table": None, "latency_check_every": 0,
    "latency_device": None, "device": None, "channels_last": True, "parallel_passes": None, "release_memory": True,
}
#: the no-argument demo: the CIFAR params-1M Zen-NAS search, sized for a few minutes on a CPU
DEFAULTS: dict[str, Any] = dict(BASE, budget_params=1e6, max_layers=18, population_size=64, max_iterations=1200)
_KEYS = set(BASE)


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str) -> dict[str, Any]:
    """A named config (``experiments/configs/zennas/<name>.yaml``) or a YAML / JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RetiaError(f"--config {name_or_path!r}: no such named config (expected one of "
                             f"{', '.join(list_configs())}, or a .yaml/.json file)")
    elif not path.is_file():
        raise RetiaError(f"--config {name_or_path!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml / json syntax errors
        raise RetiaError(f"--config {str(path)!r} is not valid {path.suffix[1:].upper()} "
                         f"({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RetiaError(f"--config {str(path)!r}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RetiaError(f"--config {str(path)!r}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    return data


def _count(text: str) -> float:
    from retia.experiments.autoformer_common import parse_count

    return parse_count(text)


def _seconds(text: str) -> float:
    """'1e-4', '0.1ms', '100us' → seconds."""
    t = str(text).strip().lower()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if t.endswith(suffix):
            t, mult = t[:-len(suffix)], scale
            break
    else:
        mult = 1.0
    try:
        return float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds per image, e.g. 1e-4 or 0.1ms") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="named config (see the list above) or a YAML/JSON file")
    p.add_argument("--output", default="runs/zennas-search", help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the search in --output where it stopped")
    p.add_argument("--fsync", action="store_true",
                   help="sync each finished trial to disk (survives power loss / a crashed node; a few ms per trial)")
    g = p.add_argument_group("search (defaults: the config's, else the CPU demo's)")
    g.add_argument("--proxy", default=None, help="zen, gradnorm, naswot, synflow, te_nas, flops, params, random")
    g.add_argument("--space", default=None, help="XXBL (ResNet-like) or IDW (MobileNet-like)")
    g.add_argument("--initial", default=None,
                   help="initial structure: cifar, imagenet_flops, imagenet_latency, a string or a file")
    g.add_argument("--budget-params", type=_count, default=None, help="e.g. 1M")
    g.add_argument("--budget-flops", type=_count, default=None, help="e.g. 400M (multiply-adds, BN included)")
    g.add_argument("--budget-latency", type=_seconds, default=None, help="seconds per image, e.g. 1e-4 or 0.1ms")
    g.add_argument("--max-layers", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=None, help="proxy batch size")
    g.add_argument("--resolution", type=positive_int, default=None)
    g.add_argument("--num-classes", type=positive_int, default=None)
    g.add_argument("--population-size", type=positive_int, default=None)
    g.add_argument("--iterations", "--max-iterations", dest="max_iterations", type=positive_int, default=None,
                   help="evolution iterations (proposals, rejected ones included)")
    g.add_argument("--fix-initialize", "--fix_initialize", dest="fix_initialize", action="store_true", default=None,
                   help="first population: mutations of the initial structure (the original)")
    g.add_argument("--random-initialize", dest="fix_initialize", action="store_false",
                   help="first population: random networks (the Adlik fork's default)")
    g.add_argument("--origin", dest="origin", action="store_true", default=None,
                   help="the original mutation (default)")
    g.add_argument("--adlik-mutation", dest="origin", action="store_false", help="the Adlik fork's mutation")
    g.add_argument("--dedup", dest="dedup", action="store_true", default=None, help="never score a structure twice")
    g.add_argument("--no-dedup", dest="dedup", action="store_false")
    g.add_argument("--gamma", type=float, default=None, help="Zen-score mixup gamma (default 1e-2)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="proxy device (default: cuda when available, else cpu)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="score in NCHW (bit-identical to retia.evaluators.zero_shot.zen_score; slower on CPUs)")
    g = p.add_argument_group("latency budget")
    g.add_argument("--latency-batch-size", type=positive_int, default=None, help="default 64 (the paper's)")
    g.add_argument("--latency-table", default=None,
                   help="JSON lookup table to reuse and extend (default: <output>/latency_table.json)")
    g.add_argument("--latency-device", default=None, help="default: cuda (fp16) when available, else cpu")
    g.add_argument("--latency-check-every", type=int, default=None,
                   help="measure every n-th scored network whole, next to its estimate (0: never)")
    g = p.add_argument_group("NNI")
    g.add_argument("--concurrency", type=positive_int, default=1,
                   help="candidates scored at once in NNI trial processes (training-service engine)")
    g.add_argument("--port", type=int, default=None, help="NNI web UI port (implies the training-service engine)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's, all cores: the Zen-score runs its two passes side by "
                        "side; use 1 on a busy machine)")
    return p


def resolve_settings(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's DEFAULTS (or BASE under ``--config``), then ``base`` (a resumed run's settings), then the config,
    then the flags."""
    settings = dict(BASE if args.config else DEFAULTS)
    settings.update({k: v for k, v in (base or {}).items() if k in _KEYS})
    if args.config:
        settings.update(load_config(args.config))
    for key in _KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    from retia.evaluators.zennas_scoring import proxy_name
    from retia.spaces import zennas

    settings["proxy"] = proxy_name(settings["proxy"])
    zennas.get_space(settings["space"])
    initial = str(settings["initial"])
    if initial in zennas.INITIAL_STRUCTURES:
        initial = zennas.INITIAL_STRUCTURES[initial]
    elif "(" not in initial:
        path = Path(initial)
        if not path.is_file():
            raise RetiaError(f"--initial {initial!r}: not a known initial structure "
                             f"({', '.join(zennas.INITIAL_STRUCTURES)}), a structure string or a file")
        initial = path.read_text().strip()
    zennas.parse(initial)
    settings["initial"] = initial
    for key in ("budget_params", "budget_flops", "budget_latency"):
        v = settings[key]
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise RetiaError(f"{key} must be a positive number, got {v!r}")
        if v is not None:
            settings[key] = float(v)
    return settings


def make_experiment(settings: dict[str, Any], strategy, workdir: Path, concurrency: int = 1,
                    port: int | None = None):
    """The NNI experiment of a Zen-NAS search: the structure-string space, the proxy scorer, ``strategy``."""
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.evaluators.zennas_scoring import ZenNASScorer
    from retia.spaces.zennas_nni import ZenNASModelSpace

    space = ZenNASModelSpace(settings["space"], settings["initial"], settings["num_classes"], settings["resolution"])
    scorer = ZenNASScorer(settings["proxy"], resolution=settings["resolution"], batch_size=settings["batch_size"],
                          num_classes=settings["num_classes"], seed=settings["seed"], mixup_gamma=settings["gamma"],
                          channels_last=settings["channels_last"], parallel=settings["parallel_passes"],
                          device=settings["device"], release_memory=settings.get("release_memory", True))
    experiment = NasExperiment(space, scorer, strategy)
    experiment.config.experiment_working_directory = str(Path(workdir).resolve())
    if concurrency > 1 or port:
        from retia.experiments.nni_frontend import use_training_service

        use_training_service(experiment, concurrency=concurrency)
    else:
        experiment.config.execution_engine = SequentialEngineConfig()
        experiment.config.model_format = RawModelFormatConfig()
    return experiment


def make_strategy(settings: dict[str, Any], run: RunDir | None, resume: bool = False, hooks=(), iteration_hooks=(),
                  fsync: bool = False):
    from retia.strategies.zennas_evolution import ZenNASEvolution

    table = None
    if settings["budget_latency"] is not None:
        from retia.evaluators.zennas_latency import LatencyTable

        path = settings["latency_table"] or (run.path / "latency_table.json" if run is not None else None)
        table = LatencyTable(device=settings["latency_device"], batch_size=settings["latency_batch_size"], path=path)
    paths = {}
    if run is not None:
        paths = {"state_path": run.path / "search_state.json", "trials_path": run.path / "trials.jsonl"}
    return ZenNASEvolution(
        population_size=settings["population_size"], max_iterations=settings["max_iterations"],
        max_layers=settings["max_layers"], budget_params=settings["budget_params"],
        budget_flops=settings["budget_flops"], budget_latency=settings["budget_latency"], latency_table=table,
        space=settings["space"], initial_structure=settings["initial"], resolution=settings["resolution"],
        num_classes=settings["num_classes"], fix_initialize=settings["fix_initialize"], origin=settings["origin"],
        dedup=settings["dedup"], seed=settings["seed"], resume=resume, fsync=fsync, trial_end_hooks=list(hooks),
        iteration_end_hooks=list(iteration_hooks), latency_check_every=settings["latency_check_every"] or 0,
        **paths)


def plot_score_vs_iteration(run: RunDir, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in run.trials() if t.get("score", -9999.0) > -9999.0]
    xs, ys = [t["iteration"] for t in trials], [t["score"] for t in trials]
    best, cur = [], -math.inf
    for y in ys:
        cur = max(cur, y)
        best.append(cur)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, ".", alpha=0.5, label="scored candidate")
    ax.plot(xs, best, "-", color="C3", label="best so far")
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet()
    set_threads(args.threads)
    logging.getLogger("nni").setLevel(logging.WARNING)
    if args.port is not None and not 0 < args.port < 65536:
        raise RetiaError(f"--port {args.port}: expected 1..65535")
    run = RunDir(args.output, resume=args.resume)
    info_path = run.path / "run.json"
    previous = json.loads(info_path.read_text()) if args.resume and info_path.exists() else {}
    settings = resolve_settings(args, previous.get("settings"))  # --resume alone continues with the saved settings
    if args.resume and not (run.path / "search_state.json").exists():
        raise RetiaError(f"--resume: {args.output!r} holds no Zen-NAS search state (search_state.json)")
    if not args.resume:
        for name in ("search_state.json", "best_structure.txt", "best.json", "search.json"):
            (run.path / name).unlink(missing_ok=True)

    from tqdm import tqdm

    total = settings["max_iterations"]
    bar = tqdm(total=total, desc=f"Zen-NAS ({settings['proxy']})", unit="it", file=sys.stdout, dynamic_ncols=True,
               mininterval=0.5)
    last_tables = [time.monotonic()]

    def on_trial(record: dict) -> None:
        best = strategy.best()
        bar.set_postfix(best=f"{best['score']:.2f}" if best else "-", scored=strategy.counts["evaluated"],
                        params=f"{record['params'] / 1e6:.2f}M", refresh=False)
        if time.monotonic() - last_tables[0] > 60:  # keep trials.csv / .json reasonably fresh
            run._rewrite_tables()
            last_tables[0] = time.monotonic()

    def on_iteration(info: dict) -> None:
        bar.update(info["iteration"] - bar.n)

    strategy = make_strategy(settings, run, resume=args.resume, hooks=[on_trial], iteration_hooks=[on_iteration],
                             fsync=args.fsync)
    experiment = make_experiment(settings, strategy, run.path / "nni", args.concurrency, args.port)
    run.write_json("run.json", {"settings": settings,
                                "experiments": previous.get("experiments", []) + [experiment.id]})
    start = time.perf_counter()
    try:
        experiment.run(port=args.port or 8080)
    finally:
        experiment.stop()
    bar.update(strategy.iteration - bar.n)
    bar.close()
    seconds = time.perf_counter() - start
    if strategy.iteration < total:
        raise RetiaError(f"the search stopped at iteration {strategy.iteration} of {total} (NNI engine budget); "
                         f"continue with --resume")
    return finish(run, strategy, settings, seconds)


def finish(run: RunDir, strategy, settings: dict[str, Any], seconds: float) -> dict:
    """Write best_structure.txt, best.json, search.json, the tables and plots; print the result."""
    from retia.spaces import zennas

    run._rewrite_tables()  # trials.csv / trials.json from trials.jsonl (the strategy appends the JSONL itself)
    best = strategy.best()
    if best is None:
        raise RetiaError("the search scored no candidate (are the budgets satisfiable by the initial structure's "
                         "mutations?)")
    (run.path / "best_structure.txt").write_text(best["structure"] + "\n")
    analysis = zennas.analyze(best["structure"], settings["resolution"], settings["num_classes"])
    run.write_json("best.json", {**best, "analysis": analysis, "proxy": settings["proxy"]})
    summary: dict[str, Any] = {"settings": settings, "iterations": strategy.iteration, "counts": strategy.counts,
                               "seconds_this_run": round(seconds, 2), "population": len(strategy.population)}
    if strategy.latency_table is not None:
        table = strategy.latency_table
        summary["latency_table"] = {"entries": len(table), "measured_this_run": table.measured,
                                    "context": table.context}
        checked = [t for t in run.trials() if "latency_measured" in t]
        if checked:
            errors = sorted(abs(t["latency"] / t["latency_measured"] - 1) for t in checked)
            summary["latency_table"]["checks"] = {"n": len(errors), "median_abs_error": errors[len(errors) // 2],
                                                  "max_abs_error": errors[-1]}
    run.write_json("search.json", summary)
    plot_score_vs_iteration(run, run.path / "score_vs_iteration.png")
    scored = [t for t in run.trials() if t["score"] > -9999.0]
    if scored:
        run.plot_pareto("params", "score", "score_vs_params.png", xlabel="parameters (M)", ylabel=settings["proxy"],
                        x_scale=1e6)
    rejected = {k[len("rejected_"):]: v for k, v in strategy.counts.items() if k.startswith("rejected_") and v}
    print(f"iterations: {strategy.iteration}  scored: {strategy.counts['evaluated']}"
          + (f"  reused: {strategy.counts['reused']}" if strategy.counts["reused"] else "")
          + (f"  rejected: {rejected}" if rejected else ""))
    print(f"best {settings['proxy']} score: {best['score']:.4f}  params: {analysis['params'] / 1e6:.3f}M  "
          f"FLOPs: {analysis['flops'] / 1e6:.1f}M  layers: {analysis['layers']}"
          + (f"  latency: {best['latency'] * 1e3:.4g} ms/image (table)" if "latency" in best else ""))
    print(f"best structure: {best['structure']}")
    print(f"results in {run.path}/: trials.csv trials.json best_structure.txt best.json search.json "
          f"score_vs_iteration.png score_vs_params.png")
    return best


if __name__ == "__main__":
    run_main(main)
