"""Zen-NAS search space (Lin et al., "Zen-NAS: A Zero-Shot NAS for High-Performance Image Recognition", ICCV 2021).

An architecture is one value: its PlainNet **structure string**, e.g.
``SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,1)SuperConvK1BNRELU(16,64,1,1)``.
The strategy, the evaluators and the result files share that string; ``to_dict`` / ``from_dict`` give a JSON
view that maps 1:1 to it.

Public API
----------
Grammar (:mod:`.grammar`, :mod:`.blocks`, :mod:`.super_blocks`)
    ``parse(structure) -> list[BlockSpec]``; ``to_string(specs) -> str`` (``to_string(parse(s)) == s`` for a
    string without whitespace); ``parse_block(token) -> BlockSpec``. Specs are frozen dataclasses, e.g.
    ``SuperResK1K3K1(in_channels=8, out_channels=16, stride=2, bottleneck_channels=8, sub_layers=1)``;
    ``dataclasses.replace`` edits them. ``block_types()``, ``register_block(cls)`` (custom blocks, see
    ``docs/zennas_space.md``). Bad strings raise a one-line ``RetiaError`` naming the token.

Model (:mod:`.model`)
    ``build(structure, num_classes=1000, *, no_BN=False, no_reslink=False, use_se=False, dropout=None) -> ZenNet``
    (an ``nn.Module``: blocks → GAP → linear; ``forward_pre_GAP(x)`` gives the pre-pooling features;
    ``get_FLOPs(res)``, ``get_model_size()``, ``get_num_layers()`` count like the original).
    ``analyze(structure, resolution, num_classes, *, no_BN=False, no_reslink=False, use_se=False)
    -> {"params": int, "flops": float, "layers": int}`` equal to the original's counting.
    ``num_layers(structure) -> int``; ``check_channels(structure)``;
    ``load_official_weights(model, path_or_state_dict, skip_head=False)``; ``official_key_map(model)``.

Search space (:mod:`.search_space`) — for an evolutionary strategy
    ``mutate(structure, space='XXBL'|'IDW', rng=None, *, num_replaces=1, method='original'|'adlik',
    split_threshold=6) -> str``;
    ``random_structure(rng=None, space='XXBL') -> str`` (the Adlik fork's random initial population);
    ``candidate_blocks(structure, block_id, space) -> list[list[str]]`` (the original ``gen_search_space``);
    ``split(structure, threshold=6) -> str``; ``fix_channels(structure) -> str``;
    ``INITIAL_STRUCTURES`` (the original scripts' fixed initial structures); ``SearchSpace``,
    ``register_space(name, space)``. ``rng`` is a ``random.Random``, an int seed or None.

    The original loop, one iteration::

        parent = initial if len(population) <= 10 else rng.choice(population)
        child = split(mutate(parent, 'XXBL', rng, num_replaces=1 if len(population) <= 10 else 2))
        if num_layers(child) > max_layers: continue
        a = analyze(child, resolution, num_classes)        # budgets: a["params"], a["flops"]
        score = proxy(build(child, num_classes, no_reslink=True))

Zoo (:mod:`.zoo`)
    ``list_models(pattern=None) -> list[str]``; ``create_model(name, num_classes=None, weights=None, *,
    dropout=None, **build_kwargs) -> ZenNet``; ``model_info(name) -> dict``; ``structure_of(name) -> str``;
    ``resolve_arch(name_or_string_or_file) -> dict``.

Tools: ``python -m retia.spaces.zennas.tools {analyze,latency,list} ...``; ``measure_latency(model, ...)``.
"""
from .blocks import (BN, RELU, SE, ConvDW, ConvKX, MaxPool, ResBlock, ResBlockProj, Residual, Sequential,
                     SequentialBlock, SqueezeExcite, Swish)
from .grammar import (DEFAULT_OPTIONS, BlockSpec, BuildOptions, block_types, get_block_type, parse, parse_block,
                      register_block, smart_round, to_string, unregister_block)
from .model import ZenNet, analyze, build, check_channels, load_official_weights, num_layers, official_key_map
from .search_space import (INITIAL_STRUCTURES, SPACES, SearchSpace, candidate_blocks, fix_channels, from_dict,
                           get_space, mutate, random_structure, register_space, split, to_dict)
from .super_blocks import (SuperBlock, SuperBlockModule, SuperConvKXBNRELU, SuperResBlock, SuperResIDWEXKX,
                           SuperResK1KXK1, SuperResKXKX)
from .zoo import MODELS, create_model, list_models, model_info, resolve_arch, structure_of


def __getattr__(name):  # the generated block classes (SuperResK1K3K1, SuperResIDWE6K7, ...) by name
    from . import super_blocks

    if name in super_blocks.__all__:
        return getattr(super_blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def measure_latency(*args, **kwargs):
    """See :func:`retia.spaces.zennas.tools.measure_latency`."""
    from .tools import measure_latency as _m

    return _m(*args, **kwargs)


__all__ = [
    "BN", "RELU", "SE", "ConvDW", "ConvKX", "MaxPool", "ResBlock", "ResBlockProj", "Residual", "Sequential",
    "SequentialBlock", "SqueezeExcite", "Swish",
    "DEFAULT_OPTIONS", "BlockSpec", "BuildOptions", "block_types", "get_block_type", "parse", "parse_block",
    "register_block", "smart_round", "to_string", "unregister_block",
    "ZenNet", "analyze", "build", "check_channels", "load_official_weights", "num_layers", "official_key_map",
    "INITIAL_STRUCTURES", "SPACES", "SearchSpace", "candidate_blocks", "fix_channels", "from_dict", "get_space",
    "mutate", "random_structure", "register_space", "split", "to_dict",
    "SuperBlock", "SuperBlockModule", "SuperConvKXBNRELU", "SuperResBlock", "SuperResIDWEXKX", "SuperResK1KXK1",
    "SuperResKXKX",
    "MODELS", "create_model", "list_models", "model_info", "resolve_arch", "structure_of",
    "measure_latency",
]
