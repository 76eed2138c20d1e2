"""Constrained evolution / random search inside an NNI experiment (sequential engine, toy space)."""
import nni
import pytest
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.experiment import NasExperiment
from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig
from nni.nas.nn.pytorch import ModelSpace, MutableLinear

from retia.errors import RetiaError
from retia.strategies import ConstrainedEvolution, ConstrainedRandom, ParamLimits


class Toy(ModelSpace):
    def __init__(self):
        super().__init__()
        self.a = MutableLinear(1, nni.choice("a", [1, 2, 3, 4, 5, 6]))
        self.b = MutableLinear(1, nni.choice("b", [1, 2, 3, 4, 5, 6]))


def size(sample):  # a stand-in parameter count
    return sample["a"] * 10 + sample["b"]


def run(strategy, trials, tmp_path):
    seen = []

    def evaluate(model):
        sample = nni.get_current_parameter().sample
        seen.append(dict(sample))
        nni.report_final_result(float(sample["a"] + sample["b"]))

    exp = NasExperiment(Toy(), FunctionalEvaluator(evaluate), strategy)
    exp.config.max_trial_number = trials
    exp.config.execution_engine = SequentialEngineConfig()
    exp.config.model_format = RawModelFormatConfig()
    exp.config.experiment_working_directory = str(tmp_path)
    exp.run()
    exp.stop()
    return seen


@pytest.mark.parametrize("make", [
    lambda c, h: ConstrainedEvolution(population_size=4, sample_size=2, mutation_prob=0.5, seed=0, constraint=c,
                                      trial_end_hooks=h),
    lambda c, h: ConstrainedRandom(seed=0, constraint=c, trial_end_hooks=h),
])
def test_every_evaluated_sample_satisfies_the_limits(make, tmp_path):
    limits = ParamLimits(size, min_params=20, max_params=45)
    population_sizes = []
    strategy = make(limits, [lambda model: population_sizes.append(len(getattr(strategy, "_population", [])))])
    seen = run(strategy, 12, tmp_path)
    assert len(seen) == 12
    assert all(20 <= size(s) <= 45 for s in seen), seen
    assert len({tuple(sorted(s.items())) for s in seen}) == 12  # dedup still holds
    assert strategy.rejected > 0  # the space has samples outside the limits, so some were refused
    if isinstance(strategy, ConstrainedEvolution):  # hooks run after the strategy took the trial in
        assert population_sizes[:4] == [1, 2, 3, 4] and max(population_sizes) == 4


def test_evolution_improves_on_random_order(tmp_path):
    seen = run(ConstrainedEvolution(population_size=5, sample_size=3, mutation_prob=0.5, seed=1), 30, tmp_path)
    first, last = seen[:5], seen[-5:]
    score = lambda ss: sum(s["a"] + s["b"] for s in ss) / len(ss)  # noqa: E731
    assert score(last) > score(first)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(RetiaError, match="sample size 100"):
        ConstrainedEvolution(population_size=50, sample_size=100)
    with pytest.raises(RetiaError, match="min 6 > max 5"):
        ParamLimits(size, min_params=6e0, max_params=5e0)
