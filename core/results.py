"""A search's run directory: every trial as JSONL/CSV/JSON, the best arch as JSON, and PNG plots.

``trials.jsonl`` is appended (and flushed) as each trial finishes, so an interrupted search loses nothing;
``trials.csv`` and ``trials.json`` are rewritten from it for people and spreadsheets.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import RetiaError


def arch_key(arch: dict) -> str:
    """A canonical string for an arch dict (sorted keys), used to deduplicate and cache trials."""
    return json.dumps(arch, sort_keys=True, default=str)


def pareto_front(points: Sequence[tuple[float, float]], maximize_y: bool = True) -> list[int]:
    """Indices of the points not dominated by another (smaller x is better; larger y is better unless
    ``maximize_y`` is False), sorted by x."""
    sign = 1.0 if maximize_y else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        y = sign * points[i][1]
        if y > best:
            front.append(i)
            best = y
    return front


class RunDir:
    """The files of one search run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RetiaError(f"run directory {str(path)!r} is a file")
        if resume and not (self.path / "trials.jsonl").exists() and not (self.path / "run.json").exists():
            raise RetiaError(f"--resume: {str(path)!r} holds no earlier run (no trials.jsonl / run.json)")
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in ("trials.jsonl", "trials.csv", "trials.json"):
                (self.path / name).unlink(missing_ok=True)

    # trials ---------------------------------------------------------------------------------------------------
    def log_trial(self, record: dict) -> None:
        """Append one finished trial (a flat-ish dict, e.g. ``{"trial", "arch", "params", "flops", "top1"}``)."""
        with (self.path / "trials.jsonl").open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._rewrite_tables()

    def trials(self) -> list[dict]:
        path = self.path / "trials.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _rewrite_tables(self) -> None:
        trials = self.trials()
        self.write_json("trials.json", trials)
        columns: list[str] = []
        for t in trials:
            columns += [k for k in t if k not in columns]
        with (self.path / "trials.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for t in trials:
                writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                                 for k, v in t.items()})

    # other files ----------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
        tmp.replace(target)
        return target

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def best(self, metric: str, maximize: bool = True) -> dict | None:
        scored = [t for t in self.trials() if t.get(metric) is not None]
        if not scored:
            return None
        return (max if maximize else min)(scored, key=lambda t: t[metric])

    # plots ----------------------------------------------------------------------------------------------------
    def plot_pareto(self, x: str, y: str, name: str = "pareto.png", xlabel: str | None = None,
                    ylabel: str | None = None, x_scale: float = 1.0) -> Path:
        """Scatter of every trial's ``y`` against ``x`` with the Pareto front (small x, large y) drawn on top."""
        plt = _pyplot()
        trials = [t for t in self.trials() if t.get(x) is not None and t.get(y) is not None]
        points = [(t[x] / x_scale, t[y]) for t in trials]
        front = pareto_front(points)
        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.5, label="trials")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return self._save(fig, name)

    def plot_progress(self, y: str, name: str = "progress.png", ylabel: str | None = None,
                      maximize: bool = True) -> Path:
        """Each trial's ``y`` in order, with the best-so-far curve."""
        plt = _pyplot()
        values = [t[y] for t in self.trials() if t.get(y) is not None]
        best, cur = [], -math.inf if maximize else math.inf
        for v in values:
            cur = max(cur, v) if maximize else min(cur, v)
            best.append(cur)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot(range(1, len(values) + 1), values, ".", alpha=0.5, label="trial")
        ax.plot(range(1, len(best) + 1), best, "-", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(ylabel or y)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return self._save(fig, name)

    def _save(self, fig, name: str) -> Path:
        target = self.path / name
        fig.savefig(target)
        _pyplot().close(fig)
        return target


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_trials(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Trials of several run directories, concatenated."""
    out: list[dict] = []
    for p in paths:
        out += RunDir(p, resume=True).trials()
    return out
