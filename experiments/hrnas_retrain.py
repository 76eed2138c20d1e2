"""Retrain a searched HR-NAS network from scratch: fresh weights, the search's task and data, no penalty, no shrinking.

``python experiments/hrnas_retrain.py --run runs/hrnas-search`` reads the search run's ``arch.json`` and
``config.yaml`` (task, data, training recipe); ``--arch arch.json`` or ``--best-model best_model.json``
(``--tokens tokens.json``, default: the ``tokens.json`` beside it, else the maximum) take the arch from a file
and ``--config FILE.yml`` the experiment (default: the schema's defaults, i.e. the no-argument search). Any
config key can be overridden as in ``hrnas_search.py`` (``--epochs 30``, ``--train.learning_rate 5e-3``,
``data.path=/data``). The network is ``HRNet(config, arch)`` with a fresh initialisation, trained by the task's
Lightning evaluator for ``train.epochs`` (with the EMA of the weights when ``train.ema_decay`` > 0) and evaluated
with the task's metric (top-1 / mIoU / AP). Writes to ``--output`` (default ``<run>/retrain``, without ``--run``
``runs/hrnas-retrain``):

* ``retrained.safetensors`` (+ ``.json`` sidecar: kind ``hrnas-retrained``, config, arch);
* ``retrain.json`` — arch, MACs, parameters, the final metric (in %), seconds, where the arch came from;
* ``trials.jsonl`` / ``.csv`` / ``.json`` — one row per epoch (validation metric in %, training loss, seconds) and
  the metric's plot (``accuracy.png``, ``miou.png``, ``ap.png``); ``logs/``; ``config.yaml``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `retia` and hrnas_search importable from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from retia.cli import quiet, run_main, seed_everything, set_threads  # noqa: E402
from retia.errors import RetiaError  # noqa: E402

try:  # noqa: SIM105 - imported as retia.experiments.hrnas_retrain or as a script beside hrnas_search.py
    from . import hrnas_search  # type: ignore[no-redef]
except ImportError:
    import hrnas_search  # type: ignore[no-redef]

RETRAINED_KIND = "hrnas-retrained"
DEFAULT_OUTPUT = "runs/hrnas-retrain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other arguments override the experiment config as in hrnas_search.py: --epochs 30, "
               "--train.learning_rate 5e-3, data.path=/data, --output DIR, --threads 2 (see docs/hrnas.md)")
    p.add_argument("--run", default=None, help="a search run directory (arch.json + config.yaml)")
    p.add_argument("--arch", default=None, help="arch.json of a search, or a plain arch dict in JSON")
    p.add_argument("--best-model", default=None, help="the original's best_model.json (inverted_residual_setting)")
    p.add_argument("--tokens", default=None, help="tokens.json for --best-model (default: the one beside it)")
    p.add_argument("--config", default=None, help="YAML experiment config (default: --run's config.yaml)")
    return p


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RetiaError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RetiaError(f"{what} {str(path)!r}: not JSON ({err.msg} at line {err.lineno})") from None


def load_arch(cfg: dict[str, Any], arch_path: str | Path | None = None, best_model: str | Path | None = None,
              tokens: str | Path | None = None) -> dict[str, int]:
    """The arch dict to retrain, checked against the network config ``cfg`` (one-line errors).

    ``arch_path``: a search's ``arch.json`` (``{"arch": ..., "config": ...}``; its network config must equal
    ``cfg``) or a plain arch dict. ``best_model``: the original's ``best_model.json`` with ``tokens`` (default:
    ``tokens.json`` beside it, else the maximum)."""
    from retia.spaces.hrnas import check_arch, from_best_model

    if (arch_path is None) == (best_model is None):
        raise RetiaError("expected one arch: --run DIR, --arch arch.json or --best-model best_model.json")
    if best_model is not None:
        path = Path(best_model)
        setting = _read_json(path, "best_model file")
        tok_path = Path(tokens) if tokens is not None else path.with_name("tokens.json")
        tok = _read_json(tok_path, "tokens file") if tokens is not None or tok_path.is_file() else None
        try:
            return check_arch(cfg, from_best_model(cfg, setting, tokens=tok))
        except RetiaError as err:
            raise RetiaError(f"{path}: {err} (the arch does not fit the config's network)") from None
    path = Path(arch_path)
    obj = _read_json(path, "arch file")
    if isinstance(obj, dict) and "arch" in obj:
        searched = obj.get("config")
        if isinstance(searched, dict):
            diff = [k for k in sorted(set(searched) | set(cfg)) if searched.get(k) != cfg.get(k)]
            if diff:
                k = diff[0]
                raise RetiaError(f"{path}: searched with network {k}={searched.get(k)!r}, the config gives "
                                 f"{cfg.get(k)!r}: expected the same network config (use the search's config.yaml "
                                 "or --run)")
        obj = obj["arch"]
    try:
        return check_arch(cfg, obj)
    except RetiaError as err:
        raise RetiaError(f"{path}: {err} (the arch does not fit the config's network)") from None


def parse(argv: list[str] | None = None):
    """``(experiment config, arch source dict, output directory)`` from the command line."""
    from retia.config import load_config, parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    source: dict[str, Any] = {"arch": args.arch, "best_model": args.best_model, "tokens": args.tokens}
    config = args.config
    output = Path(DEFAULT_OUTPUT)
    if args.run is not None:
        run = Path(args.run)
        if not run.is_dir():
            raise RetiaError(f"--run {args.run!r}: the directory does not exist; expected a search run directory "
                             "(arch.json, config.yaml)")
        for name in ("arch.json", "config.yaml"):
            if not (run / name).is_file():
                raise RetiaError(f"--run {args.run!r}: no {name}; expected a search run directory (arch.json, "
                                 "config.yaml)")
        if args.arch is None and args.best_model is None:
            source["arch"] = str(run / "arch.json")
        config = config if config is not None else str(run / "config.yaml")
        output = run / "retrain"
    elif args.arch is None and args.best_model is None:
        raise RetiaError("expected an arch: --run DIR, --arch arch.json or --best-model best_model.json")
    if args.arch is not None and args.best_model is not None:
        raise RetiaError("--arch and --best-model: expected one of them")
    aliases = hrnas_search.FLAG_KEYS
    if any(key == "output" for key, _ in parse_overrides(rest, aliases)):
        output = None
    c = load_config(config, rest, schema=hrnas_search.HRNASSearchConfig, aliases=aliases)
    return c, source, Path(c.output) if output is None else output


def epoch_rows(run, spec):
    """A Lightning callback writing one trials row per epoch (validation metric in %, training loss, seconds)."""
    import pytorch_lightning as pl

    class EpochRows(pl.Callback):
        def __init__(self):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            m = trainer.callback_metrics
            value, loss = m.get(spec.monitor), m.get("train_loss")
            run.log_trial({"epoch": trainer.current_epoch,
                           spec.metric: None if value is None else 100 * float(value),
                           "train_loss": None if loss is None else float(loss),
                           "seconds": round(time.perf_counter() - self.t0, 2)})

    return EpochRows()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    c, source, out = parse(argv)
    hrnas_search.check_config(c)
    devices = c.train.devices
    if devices != 1 or c.train.num_nodes != 1:  # its run files are not written by rank 0 alone (yet)
        raise RetiaError(f"train.devices {devices!r}, train.num_nodes {c.train.num_nodes}: hrnas_retrain.py runs in "
                         "one process; expected 1 and 1 (DDP retraining: the evaluators, see docs/hrnas.md)")
    set_threads(c.threads)
    quiet()
    seed_everything(c.seed)
    from retia.config import to_yaml
    from retia.results import RunDir
    from retia.spaces.hrnas import HRNet, count_macs
    from retia.strategies.hrnas_shrinking import WeightEMA
    from retia.weights import save_weights

    spec, cfg, datamodule, _ = hrnas_search.build_task(c, build_space=False)
    arch = load_arch(cfg, source["arch"], source["best_model"], source["tokens"])
    net = HRNet(cfg, arch)  # fresh initialisation
    macs, params = count_macs(cfg, arch), sum(p.numel() for p in net.parameters())

    run = RunDir(out)
    (out / "config.yaml").write_text(to_yaml(c))
    callbacks = [epoch_rows(run, spec)]
    if c.train.ema_decay:
        callbacks.append(WeightEMA(c.train.ema_decay))
    evaluator = spec.evaluator(c, datamodule, cfg, out / "logs", callbacks)
    print(f"retraining {macs / 1e6:.2f}M MACs, {params / 1e6:.3f}M params for {c.train.epochs} epochs -> {out}")
    start = time.perf_counter()
    evaluator.evaluate(net)
    seconds = time.perf_counter() - start
    final = evaluator.module.model  # the EMA copy when train.ema_decay > 0
    value = spec.evaluate(final, datamodule)
    rows = run.trials()
    m = spec.metric
    summary = {"arch": arch, "macs": macs, "params": params, m: 100 * value,
               f"{m}_last_epoch": rows[-1].get(m) if rows else None, "epochs": c.train.epochs,
               "seconds": round(seconds, 1), "task": spec.name, "metric": m, "ema_decay": c.train.ema_decay,
               "source": {k: v for k, v in source.items() if v is not None}, "config": cfg}
    run.write_json("retrain.json", summary)
    save_weights(final.state_dict(), out / "retrained.safetensors",
                 {"kind": RETRAINED_KIND, "config": cfg, "arch": arch})
    hrnas_search.plot_run(run, spec, macs=False)
    print(f"retrained: {macs / 1e6:.2f}M MACs, {hrnas_search._metric_text(spec, summary[m])} in {seconds:.0f} s "
          f"-> {out}")
    return summary


if __name__ == "__main__":
    run_main(main)
