"""HR-NAS (Ding et al., CVPR 2021): multi-branch high-resolution supernet with lightweight transformers.

``network``: configs / presets, the plain :class:`HRNet`, arch dicts, closed-form MACs, weight slicing.
``space``: :class:`HRNASSpace` (NNI model space) and the original's ``best_model.json`` format.
The search (progressive shrinking) is :mod:`retia.strategies.hrnas_shrinking`; see docs/hrnas.md.
"""
import os as _os

# oneDNN keeps 1,024 compiled kernels ("primitives") by default. A shrunk HR-NAS network has convolutions of many
# distinct widths, each needing a forward and two backward kernels, so the cache thrashed and the kernels were
# recompiled every step: on 2 threads a searched subnet at 0.26 of the supernet's MACs stepped slower than the
# supernet (docs/hrnas.md "Speed"). oneDNN reads the setting at its first convolution, so it is set on import,
# here rather than in ``retia`` (a Zen-NAS search, forward-only over ever new widths, gains nothing from it and
# its peak memory grew ~25 MiB); a value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from .network import (  # noqa: E402
    DEFAULTS, PRESETS, Block, BlockSpec, HRNet, Transformer, arch_choices, check_arch, count_macs, extract, full_arch,
    layout, make_config, make_divisible, preset, subnet)
from .space import (  # noqa: E402
    HRNASSpace, from_best_model, read_best_model, resolve_config, to_best_model, tokens_list, write_best_model)

__all__ = ["DEFAULTS", "PRESETS", "Block", "BlockSpec", "HRNet", "Transformer", "arch_choices", "check_arch",
           "count_macs", "extract", "full_arch", "layout", "make_config", "make_divisible", "preset", "subnet",
           "HRNASSpace", "from_best_model", "read_best_model", "resolve_config", "to_best_model", "tokens_list",
           "write_best_model"]
