"""Search by predicted performance: an AIO-P predictor as an NNI evaluator.

:class:`PredictorEvaluator` is an NNI ``FunctionalEvaluator``: for each candidate a strategy proposes it builds the
computational graph, asks the predictor and reports the prediction with ``nni.report_final_result``, so NNI's
``RegularizedEvolution``, retia's ``ConstrainedEvolution`` / ``ConstrainedRandom`` or any other strategy search by
predicted metric, with no training at all. Candidates come as

- a frozen ``nn.Module`` (e.g. an AutoFormer subnet from ``AutoformerSpace``): traced at ``input_shape``;
- a family space's arch (``space='autoformer' | 'zennas'``; for the string-valued ``ZenNASModelSpace`` the
  structure is read from the NNI sample, as :class:`retia.evaluators.zennas_scoring.ZenNASScorer` does, and the
  network is built at the family's resolution);
- an index into a pool of graphs (:class:`PoolSpace`), e.g. a labelled family.

:func:`guided_search` runs such a search on a pool whose true labels are known and reports how close the
architecture with the best *predicted* metric among the evaluated ones comes to the best *true* one: its rank
among the true labels (1 = the best), the true-metric gap, and what random picks would give.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nni
import numpy as np
import torch
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.nn.pytorch import ModelSpace
from torch import nn

from retia.errors import RetiaError

from .graph import CompGraph, build_graph
from .predictor import Predictor, load_predictor

__all__ = ["PredictorEvaluator", "PoolSpace", "guided_search", "true_rank"]


def _predictor(predictor: Predictor | str | Path) -> Predictor:
    if isinstance(predictor, Predictor):
        return predictor
    if isinstance(predictor, (str, Path)):
        return load_predictor(predictor)
    raise RetiaError(f"predictor {predictor!r}: expected a Predictor or a .safetensors predictor file")


def predict_candidate(model: Any, **_: Any) -> float:  # FunctionalEvaluator needs a function; see _execute
    raise RetiaError("PredictorEvaluator: call evaluate(candidate)")


class PredictorEvaluator(FunctionalEvaluator):
    """Reports a predictor's prediction for every candidate (see the module docstring).

    ``PredictorEvaluator(predictor, space=None, input_shape=None, pool=None, label='structure')``:
    ``predictor`` is a :class:`Predictor` or its file. ``history`` lists ``(sample, prediction)`` in order.
    """

    def __init__(self, predictor: Predictor | str | Path, *, space: str | None = None,
                 input_shape: Sequence[int] | None = None, pool: Sequence[CompGraph] | None = None,
                 label: str = "structure") -> None:
        from .family import get_space

        if space is not None:
            get_space(space)
        if pool is not None and (not pool or not all(isinstance(g, CompGraph) for g in pool)):
            raise RetiaError("PredictorEvaluator pool: expected a non-empty list of CompGraph")
        if space is None and pool is None and input_shape is None:
            raise RetiaError("PredictorEvaluator: give space=, pool= or input_shape= (how to build a candidate's "
                             "graph)")
        super().__init__(predict_candidate, predictor=predictor, space=space,
                         input_shape=tuple(input_shape) if input_shape else None, label=label)
        self.pool = list(pool) if pool is not None else None
        self.model = _predictor(predictor)
        self.history: list[tuple[Any, float]] = []

    def graph(self, candidate: Any, sample: dict | None = None) -> CompGraph:
        """The graph of a candidate: a CompGraph, a pool index, a family arch or a module."""
        args = self.arguments
        if isinstance(candidate, CompGraph):
            return candidate
        if self.pool is not None:
            index = candidate.get("index") if isinstance(candidate, dict) else candidate
            if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.pool):
                raise RetiaError(f"pool candidate {candidate!r}: expected an index 0..{len(self.pool) - 1}")
            return self.pool[int(index)]
        if args["space"] is not None and not isinstance(candidate, nn.Module):
            from .family import arch_graph

            arch = candidate
            if args["space"] == "zennas" and isinstance(candidate, dict):
                from retia.spaces.zennas_nni import structure_of_sample

                arch = structure_of_sample(candidate, args["label"])
            return arch_graph(args["space"], arch, name="candidate")
        if not isinstance(candidate, nn.Module):
            raise RetiaError(f"candidate {type(candidate).__name__}: expected an nn.Module, an arch of "
                             "space= or a pool index")
        if args["input_shape"] is None:
            from .family import get_space

            shape = get_space(args["space"]).input_shape
        else:
            shape = args["input_shape"]
        return build_graph(candidate, shape, name="candidate")

    def predict(self, candidate: Any) -> float:
        """The predicted metric of a candidate, not reported."""
        return float(self.model.predict([self.graph(candidate)])[0])

    def evaluate(self, model: Any) -> float:
        value = self.predict(model)
        sample = nni.get_current_parameter()
        self.history.append((dict(sample.sample) if sample is not None else model, value))
        nni.report_final_result(value)
        return value

    def _execute(self, model: Any) -> float:
        # NNI hands an ExecutableModelSpace: pool indices and family archs are read from its sample (no module is
        # built twice); anything else is instantiated and traced.
        sample = dict(getattr(model, "sample", None) or {})
        if self.pool is not None:
            return self.evaluate(sample)
        if self.arguments["space"] == "zennas":
            return self.evaluate(sample)
        return self.evaluate(model.executable_model())


class PoolSpace(ModelSpace):
    """An NNI space of ``n`` candidates, one ``index`` choice: a search over a fixed pool (e.g. a family)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 2:
            raise RetiaError(f"pool size {n!r}: expected an integer >= 2")
        self.index = self.add_mutable(nni.choice("index", list(range(n))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def true_rank(labels: Sequence[float], index: int) -> int:
    """1 + the number of archs whose true label beats ``labels[index]`` (1 = the best; ties share the best)."""
    y = np.asarray(labels, dtype=np.float64)
    return int((y > y[index]).sum()) + 1


def guided_search(predictor: Predictor | str | Path, graphs: Sequence[CompGraph], labels: Sequence[float],
                  strategy: str = "evolution", trials: int | None = None, seed: int = 0,
                  workdir: str | Path | None = None, population: int | None = None) -> dict[str, Any]:
    """Search ``graphs`` (true metrics ``labels``, larger is better) by ``predictor``'s predictions as an NNI
    experiment (sequential engine); ``strategy``: ``evolution`` (retia's ``ConstrainedEvolution``, i.e. NNI's
    regularized evolution) or ``random``. ``trials`` defaults to half the pool.

    Returns the found arch (best predicted among the evaluated), its true rank and gap to the best true metric,
    the expected rank of a random pick, and the search history."""
    import tempfile

    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.strategies import ConstrainedEvolution, ConstrainedRandom

    graphs = list(graphs)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(y) != len(graphs) or len(y) < 2:
        raise RetiaError(f"guided search: {len(graphs)} graphs and {len(y)} labels, expected equal sizes >= 2")
    trials = trials or max(2, len(graphs) // 2)
    if not isinstance(trials, int) or not 1 <= trials <= len(graphs):
        raise RetiaError(f"guided search trials {trials!r}: expected 1..{len(graphs)} (the pool size)")
    if strategy == "evolution":
        pop = population or max(2, min(10, trials // 2))
        strat = ConstrainedEvolution(population_size=pop, sample_size=max(1, min(pop, 3)), mutation_prob=0.5,
                                     seed=seed)
    elif strategy == "random":
        strat = ConstrainedRandom(seed=seed)
    else:
        raise RetiaError(f"guided search strategy {strategy!r}: expected evolution or random")
    evaluator = PredictorEvaluator(predictor, pool=graphs)
    with tempfile.TemporaryDirectory() as tmp:
        exp = NasExperiment(PoolSpace(len(graphs)), evaluator, strat)
        exp.config.max_trial_number = trials
        exp.config.execution_engine = SequentialEngineConfig()
        exp.config.model_format = RawModelFormatConfig()
        exp.config.experiment_working_directory = str(Path(workdir or tmp).resolve())
        exp.run()
        exp.stop()
    history = [(int(s["index"]), float(v)) for s, v in evaluator.history]
    if not history:
        raise RetiaError("guided search: no candidate was evaluated")
    found, predicted = max(history, key=lambda t: t[1])
    best = int(np.argmax(y))
    seen = sorted({i for i, _ in history})
    ranks = np.array([true_rank(y, i) for i in range(len(y))])
    return {
        "strategy": strategy, "trials": len(history), "distinct": len(seen), "pool": len(graphs),
        "found": {"index": found, "name": graphs[found].name, "predicted": predicted, "true": float(y[found]),
                  "rank": true_rank(y, found)},
        "best": {"index": best, "name": graphs[best].name, "true": float(y[best])},
        "gap": float(y[best] - y[found]),
        "best_seen_rank": int(min(ranks[seen])),  # what an oracle picking among the evaluated would get
        "random_pick_rank": float(ranks.mean()),  # expected rank of one random arch of the pool
        "history": [{"index": i, "predicted": v, "true": float(y[i])} for i, v in history],
    }
