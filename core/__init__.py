"""retia: five NAS papers on NNI 3.0.

Importing retia applies the stack's compatibility fixes once (see :mod:`retia.compat`).
The subpackages are ``retia.spaces`` (model spaces), ``retia.evaluators`` (Lightning / functional evaluators),
``retia.strategies`` (search strategies), ``retia.convert`` (weight converters), ``retia.experiments`` (entry
points) and the plumbing here: ``retia.data``, ``retia.results``, ``retia.weights``, ``retia.cli``.
"""
import os as _os

# oneDNN keeps 1,024 compiled kernels ("primitives") by default. A shrunk HR-NAS network has convolutions of many
# distinct widths, each needing a forward and two backward kernels, so the cache thrashed and the kernels were
# recompiled every step: on 2 threads a searched subnet at 0.26 of the supernet's MACs stepped slower than the
# supernet (docs/hrnas.md "Speed"). Set before torch's first convolution (oneDNN reads it lazily); a value the
# user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from . import compat as _compat  # noqa: E402
from .errors import RetiaError  # noqa: E402

__version__ = "0.1.0"
_compat.apply()

__all__ = ["RetiaError", "__version__"]
