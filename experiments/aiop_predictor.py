"""AIO-P end to end: labelled families, a GNN predictor, baselines, predictor-guided search, and (``--downstream``)
HR-NAS segmentation and / or keypoint families as held-out downstream targets.

``python experiments/aiop_predictor.py`` (no arguments):

1. builds (or resumes) two labelled families in ``<output>/families/`` (:mod:`retia.evaluators.aiop.family`): 32
   AutoFormer-micro subnets and 32 small Zen-NAS nets, each trained 2 epochs on the embedded digits (label: top-1
   %); ``--downstream`` adds 32 HR-NAS ``tiny`` segmentation nets trained on the embedded synthetic shapes (label:
   mIoU, a fraction; ~4x the CPU time of a digits family, hence not in the default), ``--downstream hrnas-kp``
   32 HR-NAS ``tiny`` keypoint nets trained on the embedded synthetic people (label: COCO OKS AP, a fraction)
   instead, ``--downstream hrnas-seg,hrnas-kp`` both. Each family uses its own recipe; ``--epochs`` / ``--lr``
   override it for all;
2. for each family as the held-out target: trains the GNN predictor on the *classification* families other than
   the target (for a downstream family: AutoFormer + Zen-NAS, AIO-P's downstream-task setting), fine-tunes it
   on 20 archs of the target (AIO-P's ``family#20``; 50 epochs, batch 4; the normaliser and the graph-level
   feature statistics are refitted there) and scores it on the rest (12), for every ``--seeds``; the zero-shot
   transfer (no fine-tuning) is reported too. The GNN's head also sees log FLOPs, log params and log node count
   (``--graph-features``, our extension; ``--no-graph-features`` for AIO-P's head). A target with no source family
   trains the GNN on its own 20 archs;
3. compares with the FLOPs and params baselines measured the same way: a line of the label on log10(FLOPs) /
   log10(params) fitted on the same 20 target archs, scored on the same held-out rest (SRCC / Kendall are those of
   FLOPs / params themselves, up to sign), and with ``graph_stats``, a least-squares fit on the GNN's three
   graph-level inputs together (log FLOPs, log params, log node count): what the graph encoder has to add to;
4. runs a predictor-guided regularized evolution (NNI, retia's ``ConstrainedEvolution``) over the held-out archs
   with half of them as the trial budget, and reports the true rank and gap of what it picks;
5. with several ``--split-seed`` values: steps 2-3 on every split (the GNN trained on the sources once per seed,
   fine-tuned per split), metrics averaged over the splits, and per target the number of splits on which the
   GNN's SRCC is above FLOPs' and params' (a single 12-arch split moves by 0.02-0.05 per swapped pair);
6. with ``--noise-ceiling K``: retrains the first K archs of every family with a second training seed and reports
   the test-retest SRCC between the two label sets (how far the labels themselves can be trusted).

Outputs in ``--output``: ``results.json`` (settings, families, metrics, searches, ceilings), ``results.csv`` (one
row per target family and predictor), ``predictions.csv``, ``scatter.png`` (predicted vs true label per target
family), ``run.json`` (timing) and ``families/``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from retia.cli import add_threads_arg, positive_int, quiet, run_main, set_threads
from retia.errors import RetiaError
from retia.evaluators.aiop.family import (SPACES, build_family, default_family_file, family_metric, get_space,
                                          load_family, noise_ceiling, settings_from_args)
from retia.results import RunDir

METRICS = ("srcc", "kendall", "mae", "mape")
DEFAULT_FAMILIES = "autoformer,zennas"
DOWNSTREAM = ("hrnas-seg", "hrnas-kp")  # the downstream-task families; a bare --downstream adds the first
DEFAULT_GRAPH_FEATURES = "flops,params,nodes"
# the baselines fitted on the same fine-tuning archs: a line on log FLOPs, on log params, and on the GNN's three
# graph-level inputs (log FLOPs, log params, log node count) together -- what the graph encoder must add to
BASELINES = ("flops", "params", "graph_stats")
METRIC_TEXT = {"top1": "top-1 (%)", "miou": "mIoU", "ap": "OKS AP"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=DEFAULT_FAMILIES,
                   help=f"comma-separated family spaces ({', '.join(SPACES)}; default: %(default)s)")
    p.add_argument("--downstream", nargs="?", const=DOWNSTREAM[0], default=None, metavar="FAMILIES",
                   help="add downstream families as held-out targets of the GNN trained on the classification "
                        f"families: comma-separated from {', '.join(DOWNSTREAM)} (hrnas-seg: HR-NAS segmentation on "
                        "synthetic shapes, mIoU; hrnas-kp: HR-NAS keypoints on synthetic people, OKS AP); "
                        f"--downstream alone means {DOWNSTREAM[0]} (default: none)")
    p.add_argument("--n", type=positive_int, default=32, help="archs per family (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs per arch for every family (default: each family's recipe)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate for every family (default: recipe)")
    p.add_argument("--family-file", action="append", default=[], metavar="SPACE=PATH",
                   help="reuse an existing family file for SPACE (repeatable)")
    p.add_argument("--finetune", type=int, default=20, help="target archs to fine-tune on (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="predictor seeds (default: 0 1 2)")
    p.add_argument("--split-seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="seed(s) of the fine-tune / test split; several average every metric over the splits and "
                        "count on how many the GNN beats each baseline (predictions, scatter plot and search: the "
                        "first split; default: 0)")
    p.add_argument("--family-seed", type=int, default=0, help="seed of the families' sampling and training")
    p.add_argument("--predictor-epochs", type=positive_int, default=40)
    p.add_argument("--finetune-epochs", type=positive_int, default=50)
    p.add_argument("--finetune-batch", type=positive_int, default=4, help="fine-tuning batch size (AIO-P: 1)")
    p.add_argument("--finetune-val", type=float, default=0.0,
                   help="fraction of the fine-tuning archs held back to early-stop fine-tuning (default: off)")
    p.add_argument("--graph-features", default=DEFAULT_GRAPH_FEATURES,
                   help="graph-level inputs of the GNN head, comma-separated from flops, params, nodes (log10 of "
                        "each; default: %(default)s)")
    p.add_argument("--no-graph-features", action="store_true",
                   help="GNN head without graph-level inputs (AIO-P's original head)")
    p.add_argument("--norm", default="stand_flops", choices=("none", "stand", "stand_flops"))
    p.add_argument("--noise-ceiling", type=positive_int, default=None, metavar="K",
                   help="retrain the first K archs of every family with a second training seed and report the SRCC "
                        "between the two label sets (default: off)")
    p.add_argument("--output", default="runs/aiop-predictor", help="run directory (default: %(default)s)")
    p.add_argument("--no-search", action="store_true", help="skip the predictor-guided search")
    p.add_argument("--no-progress", action="store_true")
    add_threads_arg(p)
    return p


def downstream_families(value: str | None) -> list[str]:
    """The families named by ``--downstream`` (None: none; a comma-separated list from :data:`DOWNSTREAM`)."""
    if value is None:
        return []
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names or any(s not in DOWNSTREAM for s in names) or len(set(names)) != len(names):
        raise RetiaError(f"--downstream {value!r}: expected distinct names from {', '.join(DOWNSTREAM)}, "
                         "comma-separated (or no value for hrnas-seg)")
    return names


def _family_files(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        space, sep, path = item.partition("=")
        if not sep or space not in SPACES or not path:
            raise RetiaError(f"--family-file {item!r}: expected SPACE=PATH with SPACE one of {', '.join(SPACES)}")
        if not Path(path).is_file():
            raise RetiaError(f"--family-file {item!r}: {path!r} does not exist")
        out[space] = Path(path)
    return out


def _mean_std(rows: list[dict]) -> dict[str, float]:
    return {**{k: float(np.mean([r[k] for r in rows])) for k in METRICS},
            **{f"{k}_std": float(np.std([r[k] for r in rows])) for k in METRICS}}


def evaluate_target(target: str, families: dict[str, tuple[list, np.ndarray]], args,
                    metric: str = "top1") -> dict[str, Any]:
    """Every predictor on one held-out family (see the module docstring); ``metric`` names its labels. With several
    ``--split-seed`` values every split is evaluated (the GNN trained on the source families once per predictor
    seed, fine-tuned once per split); metrics are means over splits (and seeds), ``per_split`` keeps each split's
    and ``wins`` counts the splits where the GNN's mean SRCC is above a baseline's."""
    from retia.evaluators.aiop.predictor import (FlopsPredictor, GNNPredictor, GraphStatsPredictor, ParamsPredictor,
                                                 split_family)

    graphs, labels = families[target]
    sources = [s for s in families if s != target and get_space(s).task == "classification"]
    g_src = [g for s in sources for g in families[s][0]]
    y_src = np.concatenate([families[s][1] for s in sources]) if sources else None
    features = False if args.no_graph_features else [f.strip() for f in args.graph_features.split(",") if f.strip()]
    make = lambda seed: GNNPredictor(norm=args.norm, epochs=args.predictor_epochs, seed=seed,  # noqa: E731
                                     graph_features=features)
    bases = {seed: make(seed).fit(g_src, y_src) for seed in args.seeds} if sources else {}
    runs: dict[str, list[dict]] = {"gnn": [], "gnn_zero_shot": [], **{name: [] for name in BASELINES}}
    per_split, out = [], None
    for split in args.split_seed:
        ft_idx, test_idx = split_family(graphs, args.finetune, seed=split)
        g_ft, y_ft = [graphs[i] for i in ft_idx], labels[ft_idx]
        g_te, y_te = [graphs[i] for i in test_idx], labels[test_idx]
        split_runs: dict[str, list[dict]] = {"gnn": [], "gnn_zero_shot": []}
        first = None
        for seed in args.seeds:
            if sources:
                split_runs["gnn_zero_shot"].append(bases[seed].score(g_te, y_te))
                tuned = bases[seed].fine_tune(g_ft, y_ft, epochs=args.finetune_epochs, batch_size=args.finetune_batch,
                                              val_fraction=args.finetune_val)
            else:
                tuned = make(seed).fit(g_ft, y_ft)
            split_runs["gnn"].append(tuned.score(g_te, y_te))
            if first is None:
                first = tuned
        baselines = {name: cls().fit(g_ft, y_ft) for name, cls in (("flops", FlopsPredictor),
                                                                     ("params", ParamsPredictor),
                                                                     ("graph_stats", GraphStatsPredictor))}
        for name, p in baselines.items():
            split_runs[name] = [p.score(g_te, y_te)]
        for name, rows in split_runs.items():
            runs[name].extend(rows)
        per_split.append({"split_seed": split, **{name: _mean_std(rows) for name, rows in split_runs.items() if rows}})
        if out is None:  # the first split's predictions and search, as with a single split
            preds = {"gnn": first.predict(g_te), **{k: p.predict(g_te) for k, p in baselines.items()}}
            out = {"predictions": [{"name": g.name, "true": float(t), **{k: float(v[i]) for k, v in preds.items()}}
                                   for i, (g, t) in enumerate(zip(g_te, y_te))],
                   "finetune": len(ft_idx), "test": len(test_idx)}
            if not args.no_search:
                from retia.evaluators.aiop.search import guided_search

                trials = max(2, len(g_te) // 2)
                out["search"] = {name: guided_search(p, g_te, y_te, trials=trials, seed=split)
                                 for name, p in (("gnn", first), ("flops", baselines["flops"]))}
    if not runs["gnn_zero_shot"]:
        del runs["gnn_zero_shot"]
    results = {name: {**_mean_std(rows), "n": rows[0]["n"], "seeds": 1 if name in BASELINES
                      else len(args.seeds), "splits": len(args.split_seed)} for name, rows in runs.items()}
    wins = {}
    for name in BASELINES:
        diff = [s["gnn"]["srcc"] - s[name]["srcc"] for s in per_split]
        wins[name] = {"above": sum(d > 0 for d in diff), "splits": len(diff), "mean_diff": float(np.mean(diff)),
                      "min_diff": float(np.min(diff))}
    per_seed = {name: rows for name, rows in runs.items() if name.startswith("gnn")}
    return {"target": target, "metric": metric, "sources": sources, "split_seeds": list(args.split_seed),
            "metrics": results, "per_seed": per_seed, "per_split": per_split, "wins": wins, **out}


def scatter(results: list[dict], path: Path) -> Path:
    from retia.results import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.2), dpi=120, squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = res["predictions"]
        true = [r["true"] for r in rows]
        metric = res.get("metric", "top1")
        for key, color in (("gnn", "C0"), ("flops", "C1"), ("params", "C2"), ("graph_stats", "C3")):
            m = res["metrics"][key]
            ax.scatter(true, [r[key] for r in rows], s=18, alpha=0.75, color=color,
                       label=f"{key}: SRCC {m['srcc']:.2f}, MAE {m['mae']:.3g}")
        lo, hi = min(true), max(true)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        text = METRIC_TEXT.get(metric, metric)
        ax.set_xlabel(f"true {text}")
        ax.set_ylabel(f"predicted {text}")
        src = "+".join(res["sources"]) or "own 20"
        ax.set_title(f"{res['target']} (train: {src}, test {res['test']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(results: list[dict]) -> str:
    lines = ["target       predictor       SRCC            Kendall         MAE            MAPE"]
    for res in results:
        for name, m in res["metrics"].items():
            def cell(k):
                sd = m.get(f"{k}_std")
                spread = m.get("seeds", 1) > 1 or m.get("splits", 1) > 1
                return f"{m[k]:.3f}" + (f" ± {sd:.3f}" if sd is not None and spread else "")
            lines.append(f"{res['target']:<12} {name:<15} {cell('srcc'):<15} {cell('kendall'):<15} "
                         f"{cell('mae'):<14} {cell('mape')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    quiet()
    logging.getLogger("nni").setLevel(logging.WARNING)
    set_threads(args.threads)
    spaces = [s.strip() for s in args.families.split(",") if s.strip()]
    for space in downstream_families(args.downstream):
        if space not in spaces:
            spaces.append(space)
    bad = [s for s in spaces if s not in SPACES]
    if not spaces or bad or len(set(spaces)) != len(spaces):
        raise RetiaError(f"--families {args.families!r}: expected distinct names from {', '.join(SPACES)}")
    reuse = _family_files(args.family_file)
    if not args.seeds:
        raise RetiaError("--seeds: expected at least one seed")
    if len(set(args.split_seed)) != len(args.split_seed):
        raise RetiaError(f"--split-seed {' '.join(map(str, args.split_seed))}: expected distinct seeds")
    start = time.perf_counter()
    run = RunDir(args.output)
    families: dict[str, tuple[list, np.ndarray]] = {}
    family_info, metrics = {}, {}
    for i, space in enumerate(spaces):
        t0 = time.perf_counter()
        if space in reuse:
            path = reuse[space]
        else:
            # the file names the settings, so other settings never meet an incompatible journal
            settings = settings_from_args(space, args, seed=args.family_seed)
            path = default_family_file(run.path / "families", space, settings, args.family_seed)
            print(f"[{i + 1}/{len(spaces) + 1}] {space} family: {args.n} archs, {settings.epochs} epochs each",
                  flush=True)
            build_family(space, args.n, path, settings, seed=args.family_seed, progress=not args.no_progress)
        families[space] = load_family(path)
        metrics[space] = family_metric(path)
        graphs, labels = families[space]
        if len(graphs) <= args.finetune + 1:
            raise RetiaError(f"--finetune {args.finetune}: family {space!r} has {len(graphs)} archs, expected more "
                             f"than {args.finetune + 1} (raise --n or lower --finetune)")
        family_info[space] = {"file": str(path), "archs": len(graphs), "metric": metrics[space],
                              "min": float(labels.min()), "max": float(labels.max()), "mean": float(labels.mean()),
                              "seconds": round(time.perf_counter() - t0, 1),
                              "train_seconds": round(sum(g.meta.get("seconds", 0.0) for g in graphs), 1)}
    ceilings = {}
    if args.noise_ceiling is not None:
        t0 = time.perf_counter()
        for space in spaces:
            k = min(args.noise_ceiling, len(families[space][0]))
            print(f"noise ceiling: {space}, {k} archs retrained with a second seed", flush=True)
            report = noise_ceiling(family_info[space]["file"], k, progress=not args.no_progress)
            ceilings[space] = {key: report[key] for key in ("srcc", "kendall", "mae", "ceiling", "k", "seed_offset",
                                                            "seconds")}
        ceiling_seconds = round(time.perf_counter() - t0, 1)
    print(f"[{len(spaces) + 1}/{len(spaces) + 1}] predictors: seeds {args.seeds}, fine-tune on {args.finetune}",
          flush=True)
    t0 = time.perf_counter()
    results = [evaluate_target(t, families, args, metrics[t]) for t in spaces]
    predictor_seconds = round(time.perf_counter() - t0, 1)
    print(_table(results))
    if len(args.split_seed) > 1:
        for res in results:
            for name, w in res["wins"].items():
                print(f"{res['target']}: GNN SRCC above {name} on {w['above']} of {w['splits']} splits (mean "
                      f"difference {w['mean_diff']:+.3f}, worst split {w['min_diff']:+.3f})")
    for space, c in ceilings.items():
        print(f"{space}: label-noise ceiling: test-retest SRCC {c['srcc']:.3f}, Kendall tau {c['kendall']:.3f} "
              f"({c['k']} archs retrained with a second seed; predictor ceiling ~ sqrt = {c['ceiling']:.2f})")
    for res in results:
        for name, s in res.get("search", {}).items():
            m = res["metric"]
            print(f"{res['target']}: {name}-guided evolution ({s['trials']} of {s['pool']} held-out archs): found "
                  f"true rank {s['found']['rank']}/{s['pool']}, {m} {s['found']['true']:.3g} vs best "
                  f"{s['best']['true']:.3g} (gap {s['gap']:.3g}); random pick: mean rank {s['random_pick_rank']:.1f}")
    summary = {"settings": vars(args), "families": family_info,
               "results": [{k: v for k, v in r.items() if k != "predictions"} for r in results]}
    if ceilings:
        summary["noise_ceiling"] = ceilings
    run.write_json("results.json", summary)
    with (run.path / "results.csv").open("w", newline="") as f:
        fields = ["target", "metric", "sources", "predictor", *METRICS, *(f"{k}_std" for k in METRICS), "n",
                  "seeds", "splits"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            for name, m in r["metrics"].items():
                writer.writerow({"target": r["target"], "metric": r["metric"], "sources": "+".join(r["sources"]),
                                 "predictor": name, **m})
    with (run.path / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["target", "metric", "name", "true", "gnn", *BASELINES])
        writer.writeheader()
        for r in results:
            for row in r["predictions"]:
                writer.writerow({"target": r["target"], "metric": r["metric"], **row})
    scatter(results, run.path / "scatter.png")
    total = round(time.perf_counter() - start, 1)
    timing = {"seconds": total, "predictor_seconds": predictor_seconds,
              "family_seconds": {k: v["seconds"] for k, v in family_info.items()}}
    if ceilings:
        timing["noise_ceiling_seconds"] = ceiling_seconds
    run.write_json("run.json", timing)
    print(f"wrote {run.path}/results.json, results.csv, predictions.csv, scatter.png ({total:.0f} s)")
    return summary


if __name__ == "__main__":
    run_main(main)
