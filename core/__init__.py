"""retia: five NAS papers on NNI 3.0.

Importing retia applies the stack's compatibility fixes once (see :mod:`retia.compat`).
The subpackages are ``retia.spaces`` (model spaces), ``retia.evaluators`` (Lightning / functional evaluators),
``retia.strategies`` (search strategies), ``retia.convert`` (weight converters), ``retia.experiments`` (entry
points) and the plumbing here: ``retia.data``, ``retia.results``, ``retia.weights``, ``retia.cli``.
"""
from . import compat as _compat
from .errors import RetiaError

__version__ = "0.1.0"
_compat.apply()

__all__ = ["RetiaError", "__version__"]
