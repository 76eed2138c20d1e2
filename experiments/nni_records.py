"""NNI experiment records that ``nnictl view`` and ``nnictl experiment export`` accept, for NAS experiments.

Why nnictl refuses experiments run by ``NasExperiment`` (nni 3.0; nnictl reads the manifest
``~/nni-experiments/.experiment``, then the config in ``<logDir>/<id>/db/nni.sqlite``, then starts an NNI manager
in read-only "view" mode on that database):

* **sequential engine** (retia's default): there is no NNI manager, so nothing writes a database.
  ``NasExperiment._start_without_nni_manager`` only adds a manifest entry (port and platform ``"N/A"``, ``logDir``
  as configured — often ``"~/nni-experiments"``, which sqlite does not expand). ``nnictl view`` dies with
  ``sqlite3.OperationalError: unable to open database file``.
* **training-service engine** (``--port``): the database exists, but its latest profile is a NAS config
  (``experimentType: nas``) that holds the search space ``NasExperiment`` sent to the web UI. nnictl loads it as a
  ``NasExperimentConfig``, whose canonicalisation refuses any search space ("`search_space` field can not be
  customized in NAS experiment") and any ``trialCodeDirectory`` other than the current directory.

A compat patch on ``import retia`` cannot help: nnictl is another process. So retia fixes the stored records:

* :class:`NnictlRecord` writes an NNI-manager database for a sequential-engine experiment while it runs (one row
  set per finished trial: its arch as the trial's parameters, intermediate and final metrics, start/end times) and
  makes the manifest entry absolute;
* :func:`make_viewable` appends a view-compatible profile revision (``experimentType`` hpo: the same trial command,
  training service, limits and search space, the NAS strategy as "tuner") to a training-service experiment's
  database. The NNI manager ignores the tuner of a NAS experiment (its strategy talks over the tuner command
  channel), so ``NasExperiment.resume()`` still works on it.

The manager of ``nnictl view`` only reads the database; the web UI then lists the trials, and ``nnictl experiment
export <id> --type csv|json`` exports them (parameters = the arch, value = the final metric).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from retia.errors import RetiaError

_SCHEMA = """
create table if not exists TrialJobEvent (timestamp integer, trialJobId text, event text, data text, logPath text,
    sequenceId integer, message text, environmentId text);
create index if not exists TrialJobEvent_trialJobId on TrialJobEvent(trialJobId);
create index if not exists TrialJobEvent_event on TrialJobEvent(event);
create table if not exists MetricData (timestamp integer, trialJobId text, parameterId text, type text,
    sequence integer, data text);
create index if not exists MetricData_trialJobId on MetricData(trialJobId);
create index if not exists MetricData_type on MetricData(type);
create table if not exists ExperimentProfile (params text, id text, execDuration integer, startTime integer,
    endTime integer, logDir text, nextSequenceId integer, revision integer);
create index if not exists ExperimentProfile_id on ExperimentProfile(id);
"""  # the NNI manager's own schema (nni_node/core/sqlDatabase.js), so its view mode reads these files as its own

NAS_ONLY_FIELDS = ("experimentType", "executionEngine", "modelFormat", "_trialCommandParams")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def legacy_search_space(model_space) -> dict[str, Any]:
    """The model space as NNI's legacy (HPO) search space: what ``NasExperiment`` shows on its web UI."""
    out = {}
    for label, mutable in model_space.simplify().items():
        try:
            out[label] = _jsonable(mutable.as_legacy_dict())
        except NotImplementedError:
            continue
    return out


# manifest ------------------------------------------------------------------------------------------------------
def manifest_entry(exp_id: str) -> dict[str, Any] | None:
    from nni.tools.nnictl.config_utils import Experiments

    return Experiments().get_all_experiments().get(exp_id)


def experiment_dir(exp_id: str, working_directory: str | os.PathLike | None = None) -> Path:
    """``<working directory>/<id>``: from ``working_directory`` or the manifest entry (``~`` expanded)."""
    if working_directory is None:
        entry = manifest_entry(exp_id)
        if entry is None:
            raise RetiaError(f"experiment {exp_id!r} is not in NNI's manifest ~/nni-experiments/.experiment "
                             f"(list them with nnictl experiment list --all)")
        working_directory = entry.get("logDir") or "~/nni-experiments"
    return Path(os.path.expanduser(str(working_directory))).resolve() / exp_id


def _fix_manifest(exp_id: str, working_directory: Path, platform: str = "local") -> None:
    # nnictl opens <logDir>/<id>/db/nni.sqlite: logDir must be absolute; "N/A" platforms confuse `nnictl list`.
    from nni.tools.nnictl.config_utils import Experiments

    experiments = Experiments()
    entry = experiments.get_all_experiments().get(exp_id)
    if entry is None:
        return
    experiments.update_experiment(exp_id, "logDir", str(working_directory))
    if entry.get("platform") in (None, "N/A"):
        experiments.update_experiment(exp_id, "platform", platform)


# database ------------------------------------------------------------------------------------------------------
def db_path(exp_dir: Path) -> Path:
    return exp_dir / "db" / "nni.sqlite"


def _connect(exp_dir: Path) -> sqlite3.Connection:
    path = db_path(exp_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30)
    conn.executescript(_SCHEMA)
    return conn


def latest_profile(exp_dir: Path, exp_id: str) -> dict[str, Any] | None:
    path = db_path(exp_dir)
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("select params, execDuration, startTime, endTime, logDir, nextSequenceId, revision "
                           "from ExperimentProfile where id=? order by revision desc limit 1", (exp_id,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    if row is None:
        return None
    keys = ("params", "execDuration", "startTime", "endTime", "logDir", "nextSequenceId", "revision")
    profile = dict(zip(keys, row))
    profile["params"] = json.loads(profile["params"])
    return profile


def _store_profile(conn: sqlite3.Connection, exp_id: str, exp_dir: Path, params: dict[str, Any],
                   start_ms: int, end_ms: int | None, next_sequence_id: int) -> None:
    revision = (conn.execute("select max(revision) from ExperimentProfile where id=?", (exp_id,)).fetchone()[0]
                or 0) + 1
    duration = max(0, int(((end_ms or _now_ms()) - start_ms) / 1000))
    conn.execute("insert into ExperimentProfile values (?,?,?,?,?,?,?,?)",
                 (json.dumps(params), exp_id, duration, start_ms, end_ms, str(exp_dir), next_sequence_id, revision))


def viewable_params(nas_params: dict[str, Any], strategy_name: str = "NAS strategy",
                    search_space: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HPO-style (``nnictl view``-loadable) profile from a NAS experiment config JSON."""
    params = {k: v for k, v in nas_params.items() if k not in NAS_ONLY_FIELDS}
    params["experimentType"] = "hpo"
    if search_space is not None:
        params["searchSpace"] = search_space
    params.setdefault("searchSpace", {})
    params.pop("searchSpaceFile", None)
    params["tuner"] = {"name": strategy_name}
    params.setdefault("trialConcurrency", 1)
    if not params.get("trialCommand"):
        params["trialCommand"] = "(NAS trials ran inside the search process)"
    service = params.get("trainingService")
    if isinstance(service, list) or not isinstance(service, dict):
        params["trainingService"] = service or {"platform": "local"}
    else:
        service.setdefault("trialCommand", params["trialCommand"])
        service.setdefault("trialCodeDirectory", params.get("trialCodeDirectory", "."))
    return params


def make_viewable(exp_id: str, working_directory: str | os.PathLike | None = None,
                  strategy_name: str | None = None) -> Path:
    """Make the stored experiment ``exp_id`` loadable by ``nnictl view``; returns its database path.

    A profile that is already HPO-style is left alone; a NAS profile (training-service engine) gets a new
    view-compatible revision. An experiment without a database (sequential engine, not recorded by
    :class:`NnictlRecord`) has no trials to show: a one-line :class:`RetiaError` says so.
    """
    exp_dir = experiment_dir(exp_id, working_directory)
    profile = latest_profile(exp_dir, exp_id)
    if profile is None:
        if not exp_dir.exists():
            raise RetiaError(f"experiment {exp_id!r}: no directory {exp_dir}")
        raise RetiaError(f"experiment {exp_id!r} ran on NNI's sequential engine without a trial record "
                         f"(no {db_path(exp_dir)}): run searches with retia.experiments.nni_records.NnictlRecord "
                         f"attached (retia's search scripts do) to view them")
    params = profile["params"]
    if params.get("experimentType") == "nas":
        conn = _connect(exp_dir)
        with conn:
            _store_profile(conn, exp_id, exp_dir, viewable_params(params, strategy_name or "NAS strategy"),
                           profile["startTime"] or _now_ms(), profile["endTime"], profile["nextSequenceId"] or 0)
        conn.close()
    _fix_manifest(exp_id, exp_dir.parent, platform=_platform(params))
    return db_path(exp_dir)


def _platform(params: dict[str, Any]) -> str:
    service = params.get("trainingService")
    if isinstance(service, list):
        return "hybrid"
    return (service or {}).get("platform", "local")


class NnictlRecord:
    """Writes a sequential-engine ``NasExperiment``'s trials into an NNI-manager database as they finish.

    Attach before ``run()``/``resume()``: ``NnictlRecord(experiment).attach()``. It wraps the experiment's
    engine factory to listen for ``TrainingEnd`` (one trial: status, arch, intermediates, final metric) and writes a
    view-compatible profile. Trials of an earlier, resumed run stay in the database; new ones continue the ids.
    Afterwards ``nnictl view <id>`` and ``nnictl experiment export <id>`` work as for an nnictl experiment.
    """

    def __init__(self, experiment, command: Iterable[str] | None = None):
        self.experiment = experiment
        self.command = " ".join(command if command is not None else [sys.executable] + sys.argv)
        self.start_ms = _now_ms()
        self._last_end_ms = self.start_ms
        self._sequence: int | None = None
        self._attached = False
        self._params_cache: dict[str, Any] | None = None

    # wiring ----------------------------------------------------------------------------------------------------
    def attach(self) -> "NnictlRecord":
        if self._attached:
            return self
        from nni.nas.execution import ModelEventType

        factory = self.experiment.execution_engine_factory

        def engine_factory(config):
            engine = factory(config)
            engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
            self._begin()
            return engine

        self.experiment.execution_engine_factory = engine_factory  # instance attribute: this experiment only
        self._attached = True
        return self

    @property
    def exp_dir(self) -> Path:
        config = self.experiment.config.canonical_copy()
        return Path(config.experiment_working_directory) / self.experiment.id

    def _params(self) -> dict[str, Any]:
        if self._params_cache is not None:
            return self._params_cache
        config = self.experiment.config.canonical_copy()
        nas = json.loads(json.dumps(config.json(), default=str))
        nas["trialCommand"] = self.command
        nas.pop("trainingService", None)
        params = viewable_params(nas, type(self.experiment.strategy).__name__,
                                 legacy_search_space(self.experiment.model_space))
        params["trainingService"] = {"platform": "local", "trialCommand": self.command,
                                     "trialCodeDirectory": params.get("trialCodeDirectory", os.getcwd())}
        self._params_cache = params
        return params

    def _begin(self) -> None:
        conn = _connect(self.exp_dir)
        with conn:
            old = conn.execute("select min(startTime), max(nextSequenceId) from ExperimentProfile where id=?",
                               (self.experiment.id,)).fetchone()
            self.start_ms = old[0] or self.start_ms
            self._sequence = old[1] or 0
            _store_profile(conn, self.experiment.id, self.exp_dir, self._params(), self.start_ms, None,
                           self._sequence)
        conn.close()
        self._last_end_ms = _now_ms()

    # events ----------------------------------------------------------------------------------------------------
    def _on_training_end(self, event) -> None:
        model = event.model
        status = getattr(event.status, "value", str(event.status))
        self.add_trial(dict(model.sample or {}), list(model.metrics.intermediates), model.metrics.final,
                       "SUCCEEDED" if status == "trained" else ("USER_CANCELED" if status == "interrupted"
                                                                else "FAILED"))

    def add_trial(self, arch: dict[str, Any], intermediates: list[Any], final: Any, status: str = "SUCCEEDED",
                  start_ms: int | None = None, end_ms: int | None = None) -> str:
        """Append one finished trial; returns its trial id (``t<sequence>``)."""
        if self._sequence is None:
            self._begin()
        seq = self._sequence
        trial_id = f"t{seq:05d}"
        start = start_ms or self._last_end_ms
        end = end_ms or max(start, _now_ms())
        hyper = json.dumps({"parameter_id": seq, "parameter_source": "algorithm",
                            "parameters": _jsonable(arch), "parameter_index": 0})
        log_path = str(self.exp_dir / "log")
        conn = _connect(self.exp_dir)
        with conn:
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (start, trial_id, "RUNNING", hyper, log_path, seq, None, "sequential"))
            for i, value in enumerate(intermediates):
                conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                             (end, trial_id, str(seq), "PERIODICAL", i, json.dumps(json.dumps(_jsonable(value)))))
            if final is not None:
                conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                             (end, trial_id, str(seq), "FINAL", 0, json.dumps(json.dumps(_jsonable(final)))))
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (end, trial_id, status, None, log_path, seq, None, "sequential"))
            self._sequence = seq + 1
            _store_profile(conn, self.experiment.id, self.exp_dir, self._params(), self.start_ms, None,
                           self._sequence)
        conn.close()
        self._last_end_ms = end
        return trial_id

    def finish(self) -> Path:
        """After ``experiment.stop()``: close the profile (end time) and make the manifest entry absolute."""
        if self._sequence is None:
            self._begin()
        conn = _connect(self.exp_dir)
        with conn:
            _store_profile(conn, self.experiment.id, self.exp_dir, self._params(), self.start_ms, _now_ms(),
                           self._sequence)
        conn.close()
        _fix_manifest(self.experiment.id, self.exp_dir.parent)
        return db_path(self.exp_dir)
