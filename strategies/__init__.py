"""Search strategies: NNI's own where they fit, subclasses of ``nni.nas.strategy`` where they do not."""
from .constrained import ConstrainedEvolution, ConstrainedRandom, ParamLimits

__all__ = ["ConstrainedEvolution", "ConstrainedRandom", "ParamLimits"]
