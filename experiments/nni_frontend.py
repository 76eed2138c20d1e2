"""NNI front ends for a ``NasExperiment``: the web UI (``--port``), trial serialisation checks, nnictl records.

* :func:`use_training_service` switches an experiment from the sequential engine (retia's fast default: every
  trial runs inside the search process) to NNI's training-service engine: an NNI manager serves the web UI on
  ``exp.run(port=P)``'s port and runs each trial as a subprocess (``python -m nni.nas.execution.training_service
  trial``) on the local — or a remote (SSH) — training service, ``concurrency`` at a time.
* On that engine a trial gets the model and the evaluator *serialised* (``nni.dump``: traced objects by their
  constructor arguments, everything else cloudpickled, at most 64 KB per trial). :func:`check_trial_serializable`
  runs that serialisation up front and turns a failure into one line that names the culprit. What breaks:
  progress bars / open files / locks captured by the evaluation function (``cannot pickle '_io.TextIOWrapper'``),
  a set-up datamodule or loaded tensors (payload over 64 KB), and ``RawModelFormatConfig`` (NNI cannot send raw
  models to trials). Lightning evaluators must be built from ``nni.trace``-d classes (NNI's ``Lightning`` /
  ``Trainer`` / ``LightningModule`` are; a LightningDataModule must be wrapped: ``nni.trace(DigitsDataModule)(...)``).
* With the simplified model format the trial rebuilds the subnet from the space's constructor arguments — fresh
  weights. A weight-sharing evaluation wraps its function in :class:`SubnetFromWeights`, which loads the subnet's
  weights from the supernet *file* inside the trial.
* :func:`record_for_nnictl` / :class:`~retia.experiments.nni_records.NnictlRecord` store the experiment so
  ``nnictl view <id>`` shows it afterwards (see :mod:`retia.experiments.nni_records` for why nnictl refuses
  NAS experiments otherwise).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from retia.errors import RetiaError

from .nni_records import NnictlRecord, make_viewable

__all__ = ["use_training_service", "check_trial_serializable", "SubnetFromWeights", "record_for_nnictl", "finish_for_nnictl",
           "NnictlRecord", "make_viewable", "PICKLE_LIMIT"]

PICKLE_LIMIT = int(os.getenv("PICKLE_SIZE_LIMIT", 64 * 1024))  # what TunerCommandChannel.send_trial allows


def use_training_service(experiment_or_config, concurrency: int = 1, training_service: Any = None,
                         check: bool = True):
    """Run ``experiment_or_config`` (a ``NasExperiment`` or its ``NasExperimentConfig``) on NNI's
    training-service engine: ``exp.run(port=P)`` then serves NNI's web UI with the trials on port ``P``.

    ``training_service``: an NNI training-service config (default ``LocalConfig``; e.g. a ``RemoteConfig`` for SSH
    machines); ``concurrency``: trials at a time. The model format becomes ``simplified`` (the only one NNI can
    send to a trial process). With an experiment and ``check``, its evaluator is serialised once now
    (:func:`check_trial_serializable`) so an unpicklable one fails here, not in the first trial. Returns the config.
    """
    from nni.experiment.config.training_services import LocalConfig
    from nni.nas.experiment.config import SimplifiedModelFormatConfig, TrainingServiceEngineConfig

    if not isinstance(concurrency, int) or concurrency < 1:
        raise RetiaError(f"trial concurrency {concurrency!r}: expected a positive integer")
    config = getattr(experiment_or_config, "config", experiment_or_config)
    config.execution_engine = TrainingServiceEngineConfig()
    config.model_format = SimplifiedModelFormatConfig()
    config.training_service = training_service if training_service is not None else LocalConfig(use_active_gpu=True)
    config.trial_concurrency = concurrency
    evaluator = getattr(experiment_or_config, "evaluator", None)
    if check and evaluator is not None:
        check_trial_serializable(evaluator)
    return config


def check_trial_serializable(evaluator, limit: int = PICKLE_LIMIT) -> int:
    """Serialise ``evaluator`` as the training-service engine will send it to a trial; returns its size in bytes.

    Raises a one-line :class:`RetiaError` naming the problem (unpicklable object, payload over ``limit``).
    """
    import nni
    from nni.common.serializer import PayloadTooLarge

    try:
        payload = nni.dump(evaluator, pickle_size_limit=limit)
        nni.load(payload)
    except Exception as exc:  # PayloadTooLarge / ValueError("Pickle too large"), TypeError, PicklingError ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, PayloadTooLarge) or "too large" in first.lower():
            raise RetiaError(f"evaluator {type(evaluator).__name__} is too large to send to NNI trials (over "
                             f"{limit} bytes): capture paths and small configs, build datasets / datamodules "
                             f"inside the trial (or nni.trace their classes)") from None
        raise RetiaError(f"evaluator {type(evaluator).__name__} cannot be sent to NNI trials: "
                         f"{type(exc).__name__}: {first} (progress bars, open files, locks or loaded data "
                         f"captured by the evaluation function?)") from None
    return len(payload)


class SubnetFromWeights:
    """A ``FunctionalEvaluator`` function for the training-service engine that evaluates subnets with inherited
    weights: NNI hands the trial a freshly initialised frozen subnet; this replaces it by ``loader(arch)`` (e.g.
    ``functools.partial(AutoformerSpace.load_subnet, weights=path)``) before calling ``function(model)``.

    Both ``function`` and ``loader`` are sent to every trial, so they must be picklable and small: pass the
    supernet *path*, never the loaded supernet.
    """

    def __init__(self, function: Callable[..., Any], loader: Callable[[dict], Any]):
        self.function, self.loader = function, loader

    def __call__(self, model, *args, **kwargs):
        import nni

        current = nni.get_current_parameter()
        arch = dict(getattr(current, "sample", None) or {})
        if not arch:
            raise RetiaError("SubnetFromWeights: no NNI sample in this trial (run it through a NasExperiment)")
        return self.function(self.loader(arch), *args, **kwargs)

    def __repr__(self) -> str:
        return f"SubnetFromWeights({self.function!r}, {self.loader!r})"


def record_for_nnictl(experiment) -> NnictlRecord | None:
    """Make ``experiment`` viewable by ``nnictl view`` — call before ``run()``/``resume()`` and keep the record::

        record = record_for_nnictl(exp)   # sequential engine: an NnictlRecord writing trials as they finish
        exp.run(...); exp.stop()
        finish_for_nnictl(exp, record)    # closes the record / fixes a ts-engine experiment's profile

    Returns ``None`` for the training-service engine (its NNI manager writes the trials itself).
    """
    from nni.nas.experiment.config import SequentialEngineConfig

    if isinstance(experiment.config.execution_engine, SequentialEngineConfig):
        return NnictlRecord(experiment).attach()
    return None


def finish_for_nnictl(experiment, record: NnictlRecord | None = None):
    """After ``experiment.stop()``: make the stored experiment loadable by ``nnictl view``; returns the DB path."""
    if record is not None:
        return record.finish()
    return make_viewable(experiment.id, experiment.config.canonical_copy().experiment_working_directory,
                         strategy_name=type(experiment.strategy).__name__)
