"""HR-NAS (Ding et al., CVPR 2021): multi-branch high-resolution supernet with lightweight transformers.

``network``: configs / presets, the plain :class:`HRNet`, arch dicts, closed-form MACs, weight slicing.
``space``: :class:`HRNASSpace` (NNI model space) and the original's ``best_model.json`` format.
The search (progressive shrinking) is :mod:`retia.strategies.hrnas_shrinking`; see docs/hrnas.md.
"""
from .network import (DEFAULTS, PRESETS, Block, BlockSpec, HRNet, Transformer, arch_choices, check_arch,
                      count_macs, extract, full_arch, layout, make_config, make_divisible, preset, subnet)
from .space import (HRNASSpace, from_best_model, read_best_model, resolve_config, to_best_model, tokens_list,
                    write_best_model)

__all__ = ["DEFAULTS", "PRESETS", "Block", "BlockSpec", "HRNet", "Transformer", "arch_choices", "check_arch",
           "count_macs", "extract", "full_arch", "layout", "make_config", "make_divisible", "preset", "subnet",
           "HRNASSpace", "from_best_model", "read_best_model", "resolve_config", "to_best_model", "tokens_list",
           "write_best_model"]
