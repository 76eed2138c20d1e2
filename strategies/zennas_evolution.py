"""Zen-NAS's evolutionary search (Lin et al., ICCV 2021) as an NNI strategy.

The loop of the original ``evolution_search.py`` (idstcv/ZenNAS) and of the Adlik fork (``--origin``,
``--fix_initialize``), one **iteration** per proposal::

    while len(population) > population_size: drop the (first) lowest-scoring individual
    if len(population) <= 10:                         # the first phase
        child = mutate(initial, num_replaces=1)      #   fix_initialize: the original mutation of the fixed start
        child = random_structure()                   #   else: the Adlik fork's random network
    else:
        parent = population[uniform random index]    # no tournament: any member, uniformly
        child = mutate(parent, num_replaces=2)       # origin: the original mutation, else the Adlik fork's
    [original mutation: split once more, as idstcv does]
    skip when: seen before (dedup, the Adlik fork) | layers > max_layers | params > budget | FLOPs > budget
               | latency > budget
    score = proxy(child without residual links); population.append(child)

Budgets are counted like the original (``retia.spaces.zennas.analyze``: with residual links, at ``resolution``,
``num_classes`` outputs); latency comes from a per-block lookup table (:mod:`retia.evaluators.zennas_latency`)
instead of measuring every candidate. Rejected proposals count as iterations, as in the original.

NNI integration: the model space has one mutable, the structure string (:mod:`retia.spaces.zennas_nni`);
every accepted child is frozen (``{"structure": s}``) and submitted to the execution engine, whose evaluator
(e.g. :class:`retia.evaluators.zennas_scoring.ZenNASScorer`) reports the score. On NNI's sequential engine this is
exactly the original's sequential loop. On the training-service engine with ``trial_concurrency = k`` up to k
children are scored at once in trial processes; parents are then drawn from the finished population (an
asynchronous evolution: a child proposed while k-1 others run does not see their scores).

Checkpoints: with ``state_path`` and ``trials_path`` the strategy appends every finished trial to a JSONL log
(``RunDir``'s ``trials.jsonl`` format; flushed per line, ``fsync=True`` also syncs it to disk) and atomically
rewrites a small JSON state (iteration counter, RNG state, population as indices into the log, running
candidates) after **every** finished trial. Each state is a consistent snapshot, so ``resume=True`` continues
from it: no finished trial is lost or repeated (a candidate that was being scored when the process died is scored
again; one whose result reached the log is taken from it), and proposals made after the snapshot (rejected
children, submitted ones) are made again identically from the saved RNG state — they cost milliseconds, and not
rewriting the state for each of them saves as much per iteration. ``state_dict()`` /
``load_state_dict()`` give the same state for NNI's own experiment checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from nni.nas.execution import ExecutionEngine, ModelEvent, ModelEventType
from nni.nas.space import ExecutableModelSpace, ModelStatus
from nni.nas.strategy.base import Strategy

from retia.errors import RetiaError
from retia.spaces import zennas

__all__ = ["FAILED_SCORE", "TrialLog", "ZenNASEvolution"]

_logger = logging.getLogger(__name__)

FAILED_SCORE = -9999.0  # a candidate whose scoring failed (the original's value)
STATE_VERSION = 1
REJECT_REASONS = ("duplicate", "layers", "params", "flops", "latency")


class TrialLog:
    """Append-only JSON-lines log of finished trials, one record per line (``RunDir``'s ``trials.jsonl``).

    ``append`` flushes (and with ``fsync=True`` syncs) each line, so a killed process loses nothing that
    was appended; ``read`` drops a torn last line.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._file = None

    def append(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is unusable
        return records

    def truncate(self, records: list[dict]) -> None:
        """Rewrite the log to exactly ``records`` (drops a torn or unaccounted tail)."""
        self.close()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
        tmp.replace(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _positive(name: str, value: Any, allow_none: bool = True, integer: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise RetiaError(f"{name} must be {kind}{' or None' if allow_none else ''}, got {value!r}")
    return int(value) if integer else value


class ZenNASEvolution(Strategy):
    """Zen-NAS evolutionary search (see the module docstring).

    Parameters
    ----------
    population_size, max_iterations
        The original's ``--population_size`` (512) and ``--evolution_max_iter`` (480000).
    max_layers, budget_params, budget_flops, budget_latency
        Constraints; ``None`` = none. Latency is seconds per image (``--budget_latency 1e-4`` = 0.1 ms).
    latency_table
        A :class:`retia.evaluators.zennas_latency.LatencyTable` (needed with ``budget_latency``; default: one on
        the search device).
    space, initial_structure, resolution, num_classes
        Default: from the model space's :class:`~retia.spaces.zennas_nni.StructureString` mutable.
    fix_initialize, origin, dedup
        The Adlik fork's switches: start from the fixed initial structure (else a random population), use the
        original mutation (else the fork's), never evaluate a structure twice. Defaults: the original's behaviour
        plus dedup. Without dedup a structure seen before is not scored again: its (deterministic) score is reused.
    seed
        Seeds the mutation RNG (``random.Random``); ``None`` = nondeterministic.
    init_population
        The first phase lasts while the population has at most this many members (10 in the original).
    state_path, trials_path, resume, fsync
        Checkpoint files (see the module docstring).
    trial_end_hooks
        ``hook(record)`` after each finished trial (record already in the population and the log).
    iteration_end_hooks
        ``hook(info)`` after each iteration, ``info = {"iteration", "status", "structure"}``; status is
        ``"submitted"``, ``"reused"`` or ``"rejected:<reason>"``.
    latency_check_every
        With a latency budget, measure every n-th evaluated child as a whole network too and log it as
        ``latency_measured`` next to the estimate (0 = never).
    """

    def __init__(self, *, population_size: int = 512, max_iterations: int = 480_000, max_layers: int | None = None,
                 budget_params: float | None = None, budget_flops: float | None = None,
                 budget_latency: float | None = None, latency_table=None, space: str | None = None,
                 initial_structure: str | None = None, resolution: int | None = None, num_classes: int | None = None,
                 fix_initialize: bool = True, origin: bool = True, dedup: bool = True, seed: int | None = None,
                 init_population: int = 10, split_threshold: int = 6,
                 state_path: str | os.PathLike | None = None, trials_path: str | os.PathLike | None = None,
                 resume: bool = False, fsync: bool = False,
                 trial_end_hooks: Iterable[Callable[[dict], None]] = (),
                 iteration_end_hooks: Iterable[Callable[[dict], None]] = (), latency_check_every: int = 0):
        super().__init__()
        self.population_size = _positive("population_size", population_size, False, True)
        self.max_iterations = _positive("max_iterations", max_iterations, False, True)
        self.max_layers = _positive("max_layers", max_layers, True, True)
        self.budget_params = _positive("budget_params", budget_params)
        self.budget_flops = _positive("budget_flops", budget_flops)
        self.budget_latency = _positive("budget_latency", budget_latency)
        if isinstance(init_population, bool) or not isinstance(init_population, int) or init_population < 0:
            raise RetiaError(f"init_population must be an integer >= 0, got {init_population!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RetiaError(f"seed must be an integer or None, got {seed!r}")
        if resume and (state_path is None or trials_path is None):
            raise RetiaError("resume needs state_path and trials_path (the checkpoint of the search to continue)")
        if (state_path is None) != (trials_path is None):
            raise RetiaError("state_path and trials_path go together (the state indexes the trials log)")
        self.latency_table = latency_table
        self._space_arg, self._initial_arg = space, initial_structure
        self._resolution_arg, self._num_classes_arg = resolution, num_classes
        self.fix_initialize, self.origin, self.dedup = bool(fix_initialize), bool(origin), bool(dedup)
        self.seed, self.init_population, self.split_threshold = seed, init_population, split_threshold
        self.state_path = Path(state_path) if state_path is not None else None
        self.trials_log = TrialLog(trials_path, fsync=fsync) if trials_path is not None else None
        self.resume = resume
        self.trial_end_hooks: list[Callable[[dict], None]] = list(trial_end_hooks)
        self.iteration_end_hooks: list[Callable[[dict], None]] = list(iteration_end_hooks)
        self.latency_check_every = int(latency_check_every)

        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._iteration = 0
        self._num_trials = 0
        self._population: list[dict] = []      # records of the finished individuals, in order of arrival
        self._population_ids: list[int] = []   # their indices in the trials log
        self._seen: set[str] = set()           # structures scored or being scored
        self._scores: dict[str, float] = {}    # without dedup: structure -> score (for reuse)
        self._pending: dict[int, dict] = {}    # iteration -> candidate being scored
        self._running: dict[int, tuple[Any, dict]] = {}  # id(model) -> (model, candidate)
        self._restored_pending: list[dict] = []
        self.counts = {"evaluated": 0, "reused": 0, **{f"rejected_{r}": 0 for r in REJECT_REASONS}}
        self._best: dict | None = None
        self._last_table_save = 0.0

    # ---- configuration from the model space ---------------------------------------------------------------
    def _initialize(self, model_space: ExecutableModelSpace, engine: ExecutionEngine) -> ExecutableModelSpace:
        from retia.spaces.zennas_nni import StructureString

        mutables = model_space.simplify()
        structures = [m for m in mutables.values() if isinstance(m, StructureString)]
        if len(structures) != 1 or len(mutables) != 1:
            raise RetiaError(f"ZenNASEvolution needs a model space with exactly one StructureString mutable "
                             f"(retia.spaces.zennas_nni.ZenNASModelSpace), got {list(mutables)}")
        mutable = structures[0]
        self.label = mutable.label
        self.space = self._space_arg or mutable.space
        zennas.get_space(self.space)
        self.initial = self._initial_arg or mutable.initial
        zennas.parse(self.initial)
        self.resolution = self._resolution_arg or mutable.resolution
        self.num_classes = self._num_classes_arg or mutable.num_classes
        if self.budget_latency is not None and self.latency_table is None:
            from retia.evaluators.zennas_latency import LatencyTable

            self.latency_table = LatencyTable()
        if self.resume:
            self._load_checkpoint()
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
        self._save_table(force=True)
        if self.trials_log is not None:
            self.trials_log.close()

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed."""
        return {"population_size": self.population_size, "max_layers": self.max_layers,
                "budget_params": self.budget_params, "budget_flops": self.budget_flops,
                "budget_latency": self.budget_latency, "space": self.space, "initial": self.initial,
                "resolution": self.resolution, "num_classes": self.num_classes,
                "fix_initialize": self.fix_initialize, "origin": self.origin, "dedup": self.dedup,
                "seed": self.seed, "init_population": self.init_population,
                "split_threshold": self.split_threshold}

    def extra_repr(self) -> str:
        return (f"population_size={self.population_size}, max_iterations={self.max_iterations}, "
                f"max_layers={self.max_layers}, budget_params={self.budget_params}, budget_flops={self.budget_flops}, "
                f"budget_latency={self.budget_latency}, fix_initialize={self.fix_initialize}, origin={self.origin}, "
                f"dedup={self.dedup}")

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Iterations done (proposals made, rejected ones included)."""
        return self._iteration

    @property
    def population(self) -> list[dict]:
        with self._lock:
            return list(self._population)

    def best(self) -> dict | None:
        """The best record so far (ties: the earliest)."""
        return self._best

    def _rng_state(self) -> list:
        version, internal, gauss = self._rng.getstate()
        return [version, list(internal), gauss]

    def _set_rng_state(self, state: list) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))

    def _compact_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self.config(), "iteration": self._iteration,
                "rng": self._rng_state(), "trials": self._num_trials, "population": list(self._population_ids),
                "pending": sorted(self._pending.values(), key=lambda c: c["iteration"]),
                "counts": dict(self.counts)}

    def state_dict(self) -> dict:
        """The whole search state (population records and seen structures included) for NNI checkpoints."""
        with self._lock:
            state = self._compact_state()
            state["population_records"] = [dict(r) for r in self._population]
            state["seen"] = sorted(self._seen - {c["structure"] for c in self._pending.values()})
            state["scores"] = dict(self._scores)
            return state

    def load_state_dict(self, state_dict: dict) -> None:
        with self._lock:
            self._check_state(state_dict)
            self._iteration = int(state_dict["iteration"])
            self._set_rng_state(state_dict["rng"])
            self._num_trials = int(state_dict["trials"])
            self._population = [dict(r) for r in state_dict["population_records"]]
            self._population_ids = list(state_dict["population"])
            self._seen = set(state_dict["seen"])
            self._scores = dict(state_dict.get("scores", {}))
            self.counts.update(state_dict.get("counts", {}))
            self._restored_pending = list(state_dict.get("pending", []))
            self._seen.update(c["structure"] for c in self._restored_pending)
            self._update_best_from(self._population)

    def _check_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise RetiaError(f"search checkpoint version {state.get('version')!r}: expected {STATE_VERSION}")
        saved, now = state.get("config", {}), self.config()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise RetiaError(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, this search has "
                             f"{k}={now[k]!r} (start a new search or use the same settings)")

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        state = self._compact_state()
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(json.dumps(state, separators=(",", ":")))
        tmp.replace(self.state_path)

    def _save_table(self, force: bool = False) -> None:
        table = self.latency_table
        if table is None or getattr(table, "path", None) is None:
            return
        now = time.monotonic()
        if force or now - self._last_table_save > 30:
            table.save()
            self._last_table_save = now

    def _load_checkpoint(self) -> None:
        assert self.state_path is not None and self.trials_log is not None
        if not self.state_path.exists():
            raise RetiaError(f"--resume: no search state at {str(self.state_path)!r}")
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as err:
            raise RetiaError(f"--resume: {str(self.state_path)!r} is not a search state ({err})") from None
        self._check_state(state)
        records = self.trials_log.read()
        n = int(state["trials"])
        if len(records) < n:
            raise RetiaError(f"--resume: {str(self.trials_log.path)!r} holds {len(records)} trials, the state "
                             f"expects {n}")
        pending = {c["iteration"]: c for c in state.get("pending", [])}
        # results that reached the log after the last state write: candidates that were pending then
        extra = records[n:]
        adopted = []
        for rec in extra:
            cand = pending.get(rec.get("iteration"))
            if cand is None or cand["structure"] != rec.get("structure"):
                break
            adopted.append(rec)
            del pending[rec["iteration"]]
        records = records[:n + len(adopted)]
        self.trials_log.truncate(records)
        self._iteration = int(state["iteration"])
        self._set_rng_state(state["rng"])
        self.counts.update(state.get("counts", {}))
        self._num_trials = n
        self._seen = {r["structure"] for r in records[:n]}
        if not self.dedup:
            self._scores = {r["structure"]: r["score"] for r in records[:n]}
        ids = list(state["population"])
        self._population_ids = ids
        self._population = [records[i] for i in ids]
        self._update_best_from(records[:n])
        for rec in adopted:  # replay them as if they had just finished
            self._num_trials += 1
            self._add_to_population(rec, self._num_trials - 1)
            self._seen.add(rec["structure"])
            self.counts["evaluated"] += 1
        self._restored_pending = sorted(pending.values(), key=lambda c: c["iteration"])
        self._seen.update(c["structure"] for c in self._restored_pending)
        self._save_state()
        _logger.info("resumed at iteration %d with %d trials (%d adopted from the log, %d to score again)",
                     self._iteration, self._num_trials, len(adopted), len(self._restored_pending))

    def _update_best_from(self, records: Iterable[dict]) -> None:
        for r in records:
            if self._best is None or r["score"] > self._best["score"]:
                self._best = r

    # ---- the evolution ------------------------------------------------------------------------------------
    def _mutate(self, structure: str, num_replaces: int, method: str) -> str:
        child = zennas.mutate(structure, self.space, self._rng, num_replaces=num_replaces, method=method,
                              split_threshold=self.split_threshold)
        if method == "original":  # idstcv splits the mutated string once more (a no-op unless sub_layers >= 12)
            child = zennas.split(child, self.split_threshold)
        return child

    def _propose(self) -> tuple[dict | None, str]:
        """One iteration: a child and ``"ok"``, or ``None`` and the reason it was rejected."""
        it = self._iteration
        self._iteration += 1
        if len(self._population) <= self.init_population:
            if self.fix_initialize:
                child = self._mutate(self.initial, 1, "original")
            else:
                child = zennas.random_structure(self._rng, self.space)
        else:
            parent = self._population[self._rng.randint(0, len(self._population) - 1)]
            child = self._mutate(parent["structure"], 2, "original" if self.origin else "adlik")
        if self.dedup and child in self._seen:
            return None, "duplicate"
        layers = zennas.num_layers(child)
        if self.max_layers is not None and layers > self.max_layers:
            return None, "layers"
        counts = zennas.analyze(child, self.resolution, self.num_classes)
        if self.budget_params is not None and counts["params"] > self.budget_params:
            return None, "params"
        if self.budget_flops is not None and counts["flops"] > self.budget_flops:
            return None, "flops"
        cand = {"iteration": it, "structure": child, "params": counts["params"], "flops": counts["flops"],
                "layers": layers}
        if self.budget_latency is not None:
            latency = self.latency_table.estimate(child, self.resolution, self.num_classes)
            if latency > self.budget_latency:
                return None, "latency"
            cand["latency"] = latency
        return cand, "ok"

    def _add_to_population(self, record: dict, index: int) -> None:
        self._population.append(record)
        self._population_ids.append(index)
        while len(self._population) > self.population_size:
            scores = [r["score"] for r in self._population]
            worst = scores.index(min(scores))
            del self._population[worst]
            del self._population_ids[worst]
        if self._best is None or record["score"] > self._best["score"]:
            self._best = record

    def _record(self, cand: dict, score: float | None, seconds: float | None, reused: bool = False) -> dict:
        """Log a finished candidate and add it to the population (under the lock)."""
        if score is None or score != score:  # failed or NaN
            score = FAILED_SCORE
        record = {"trial": self._num_trials + 1, "iteration": cand["iteration"], "structure": cand["structure"],
                  "score": float(score), "params": cand["params"], "flops": cand["flops"], "layers": cand["layers"]}
        if "latency" in cand:
            record["latency"] = cand["latency"]
            if self.latency_check_every and not reused and \
                    (self.counts["evaluated"] + 1) % self.latency_check_every == 0:
                record["latency_measured"] = self.latency_table.measure(cand["structure"], self.resolution,
                                                                        self.num_classes)
        if reused:
            record["reused"] = True
        if seconds is not None:
            record["seconds"] = round(seconds, 4)
            record["finished"] = round(time.time(), 3)
        if self.trials_log is not None:
            self.trials_log.append(record)
        self._num_trials += 1
        self._add_to_population(record, self._num_trials - 1)
        self._pending.pop(cand["iteration"], None)
        self.counts["reused" if reused else "evaluated"] += 1
        if not self.dedup:
            self._scores[cand["structure"]] = record["score"]
        self._save_state()
        self._save_table()
        return record

    def _submit(self, cand: dict) -> None:
        model = self.model_space.freeze({self.label: cand["structure"]})
        with self._lock:
            cand = dict(cand, submitted=time.time())
            self._pending[cand["iteration"]] = {k: v for k, v in cand.items() if k != "submitted"}
            self._running[id(model)] = (model, cand)
            self._seen.add(cand["structure"])
        self.engine.submit_models(model)

    def _on_training_end(self, event: ModelEvent) -> None:
        with self._lock:
            entry = self._running.get(id(event.model))
            if entry is None or entry[0] is not event.model:
                _logger.warning("%s was not submitted by this strategy: ignored", event.model)
                return
            del self._running[id(event.model)]
            model, cand = entry
            # the engine sets the model's status after the callbacks: the event carries the new one
            metric = model.metric if event.status == ModelStatus.Trained else None
            if isinstance(metric, dict):
                metric = metric.get("default")
            record = self._record(cand, metric, time.time() - cand["submitted"])
        for hook in self.trial_end_hooks:
            hook(record)

    def _iteration_end(self, info: dict) -> None:
        for hook in self.iteration_end_hooks:
            hook(info)

    def _run(self) -> None:
        for cand in self._restored_pending:  # candidates that were being scored when the last run stopped
            if not self.wait_for_resource():
                return
            self._submit(cand)
        self._restored_pending = []
        while True:
            with self._lock:
                if self._iteration >= self.max_iterations:
                    break
            if not self.wait_for_resource():
                _logger.info("the engine's budget is exhausted at iteration %d", self._iteration)
                break
            reused = None
            with self._lock:
                cand, status = self._propose()
                if cand is None:
                    self.counts[f"rejected_{status}"] += 1
                elif not self.dedup and cand["structure"] in self._scores:
                    reused = self._record(cand, self._scores[cand["structure"]], None, reused=True)
            if cand is None:
                self._iteration_end({"iteration": self._iteration, "status": f"rejected:{status}", "structure": None})
                continue
            if reused is not None:
                for hook in self.trial_end_hooks:
                    hook(reused)
                self._iteration_end({"iteration": self._iteration, "status": "reused",
                                     "structure": cand["structure"]})
                continue
            self._submit(cand)
            self._iteration_end({"iteration": self._iteration, "status": "submitted", "structure": cand["structure"]})
        self.engine.wait_models()
