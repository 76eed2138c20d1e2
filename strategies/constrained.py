"""NNI's regularized evolution and random search with a resource constraint and per-trial hooks.

NNI's ``RegularizedEvolution`` and ``Random`` sample any architecture; AutoFormer searches inside a parameter
budget (e.g. 5–6M for tiny). Here a sample that breaks the constraint is rejected before it is submitted and
resampled (NNI's own retry loop), so it is neither trained, evaluated nor counted as a trial. ``trial_end_hooks``
run after the strategy has taken each finished trial into its state — the search uses one to checkpoint the
experiment after every trial, so an interrupted search resumes without losing any.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from nni.mutable import SampleValidationError
from nni.nas.execution import ExecutionEngine, ModelEvent, ModelEventType
from nni.nas.space import ExecutableModelSpace
from nni.nas.strategy import Random, RegularizedEvolution

from ..errors import RetiaError

_logger = logging.getLogger(__name__)

Sample = dict[str, Any]


class ParamLimits:
    """Accepts an arch whose parameter count (by ``counter(arch)``) lies in ``[min_params, max_params]``."""

    def __init__(self, counter: Callable[[Sample], int], min_params: float | None = None,
                 max_params: float | None = None):
        if min_params is not None and max_params is not None and min_params > max_params:
            raise RetiaError(f"parameter limits: min {min_params:g} > max {max_params:g}")
        self.counter, self.min_params, self.max_params = counter, min_params, max_params

    def __call__(self, sample: Sample) -> bool:
        n = self.counter(sample)
        return (self.min_params is None or n >= self.min_params) and (self.max_params is None or n <= self.max_params)

    def __repr__(self) -> str:
        return f"ParamLimits(min={self.min_params}, max={self.max_params})"


class _ConstrainedMixin:
    """Rejects (and un-registers from dedup) samples that break ``constraint``; runs ``trial_end_hooks``."""

    constraint: Callable[[Sample], bool] | None
    trial_end_hooks: list[Callable[[ExecutableModelSpace], None]]
    _dedup_helper: Any

    def _init_constraint(self, constraint, trial_end_hooks) -> None:
        self.constraint = constraint
        self.trial_end_hooks = list(trial_end_hooks or [])
        self.rejected = 0

    def _enforce(self, model: ExecutableModelSpace) -> ExecutableModelSpace:
        if self.constraint is not None and not self.constraint(model.sample):
            self.rejected += 1
            if self._dedup_helper is not None:
                self._dedup_helper.remove(model.sample)
            raise SampleValidationError(f"sample breaks {self.constraint}: {model.sample}")
        return model

    def _initialize(self, model_space, engine: ExecutionEngine):
        model_space = super()._initialize(model_space, engine)  # type: ignore[misc]
        # Registered after the strategy's own callback, so hooks see the trial already in the strategy state.
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._run_trial_end_hooks)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.TrainingEnd,  # type: ignore[attr-defined]
                                                    self._run_trial_end_hooks)
        super()._cleanup()  # type: ignore[misc]

    def _run_trial_end_hooks(self, event: ModelEvent) -> None:
        for hook in self.trial_end_hooks:
            hook(event.model)


class ConstrainedEvolution(_ConstrainedMixin, RegularizedEvolution):
    """``RegularizedEvolution`` whose random and mutated individuals all satisfy ``constraint``."""

    def __init__(self, *, constraint: Callable[[Sample], bool] | None = None,
                 trial_end_hooks: list[Callable] | None = None, **kwargs):
        population, sample = kwargs.get("population_size", 100), kwargs.get("sample_size", 25)
        if not 1 <= sample <= population:
            raise RetiaError(f"evolution sample size {sample}: expected 1..population size ({population})")
        super().__init__(**kwargs)
        self._init_constraint(constraint, trial_end_hooks)

    def random(self) -> ExecutableModelSpace:
        return self._enforce(super().random())

    def new_individual(self) -> ExecutableModelSpace:
        return self._enforce(super().new_individual())


class ConstrainedRandom(_ConstrainedMixin, Random):
    """NNI's ``Random`` search restricted to samples that satisfy ``constraint``."""

    def __init__(self, *, constraint: Callable[[Sample], bool] | None = None,
                 trial_end_hooks: list[Callable] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_constraint(constraint, trial_end_hooks)

    def random(self, model_space: ExecutableModelSpace) -> ExecutableModelSpace:
        return self._enforce(super().random(model_space))
