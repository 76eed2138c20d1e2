"""Zen-NAS search spaces (ResNet-like ``XXBL``, MobileNet-like ``IDW``) and the mutations of its evolution.

An architecture is one value, its structure string; every function here takes and returns strings (a
list of block specs is accepted too). ``to_dict`` / ``from_dict`` give a JSON view that maps 1:1 to it.

Candidate generation (``gen_search_space``) follows ``SearchSpace/search_space_XXBL.py`` and
``search_space_IDW_fixfc.py``; ``mutate(method='original')`` follows ``evolution_search.py``'s
``get_new_random_structure_str``; ``mutate(method='adlik')`` and ``random_structure`` follow the Adlik fork's
``SearchSpace/search_choice.py`` (its default mutation; ``--origin`` selects the original one).
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from retia.errors import RetiaError

from .grammar import BlockSpec, get_block_type, parse, parse_block, smart_round, to_string
from .super_blocks import SuperBlock, SuperConvKXBNRELU, SuperResBlock

__all__ = [
    "INITIAL_STRUCTURES",
    "SPACES",
    "SearchSpace",
    "candidate_blocks",
    "fix_channels",
    "from_dict",
    "get_space",
    "mutate",
    "random_structure",
    "register_space",
    "split",
    "to_dict",
]

Structure = Union[str, Sequence[BlockSpec]]
RngLike = Union[random.Random, int, None]

#: The fixed initial structures of the original search scripts (``--plainnet_struct_txt``).
#: ``imagenet_latency`` is kept verbatim: its last block's input channels (256) do not match the 512 before
#: it; the first mutation re-chains the channels.
INITIAL_STRUCTURES = {
    # scripts/*_NAS_cifar_params{1M,2M}.sh, space XXBL, max_layers 18
    "cifar": "SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,16,1,8,1)SuperResK3K3(16,32,2,16,1)"
             "SuperResK3K3(32,64,2,32,1)SuperResK3K3(64,64,2,32,1)SuperConvK1BNRELU(64,128,1,1)",
    # scripts/Zen_NAS_ImageNet_flops{400,600,800}M.sh, space IDW, max_layers 14 (16 for 800M)
    "imagenet_flops": "SuperConvK3BNRELU(3,8,2,1)SuperResIDWE6K3(8,32,2,8,1)SuperResIDWE6K3(32,48,2,32,1)"
                      "SuperResIDWE6K3(48,96,2,48,1)SuperResIDWE6K3(96,128,2,96,1)SuperConvK1BNRELU(128,2048,1,1)",
    # scripts/Zen_NAS_ImageNet_latency*.sh, space XXBL, max_layers 10..
    "imagenet_latency": "SuperConvK3BNRELU(3,32,2,1)SuperResK3K3(32,64,2,32,1)SuperResK3K3(64,128,2,64,1)"
                        "SuperResK3K3(128,256,2,128,1)SuperResK3K3(256,512,2,256,1)SuperConvK1BNRELU(256,512,1,1)",
}

_RATIOS = (2.5, 2, 1.5, 1.25, 1, 1 / 1.25, 1 / 1.5, 1 / 2, 1 / 2.5)


def _rng(rng: RngLike) -> random.Random:
    if rng is None:
        return random.Random()
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise RetiaError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")


def _specs(structure: Structure) -> list[BlockSpec]:
    return parse(structure)


@dataclass(frozen=True)
class SearchSpace:
    """A candidate-block generator in the manner of the original ``SearchSpace/*.py``.

    ``block_groups``: groups of super-block type names. For a residual block, each group yields candidates
    of its types with widths ``out·{2.5,2,1.5,1.25,1,1/1.25,1/1.5,1/2,1/2.5}`` (rounded to 8, at least 8,
    at most ``max_channels`` when set), the same ratios of the bottleneck, and ``sub_layers + {0,1,2,-1,-2}``
    (> 0). As in the original, a group's lists accumulate and alias: the k-th list holds the candidates
    of the group's first k+1 types (the last two lists: all types), so in the flattened pool a group's first
    two types appear in every list and later types in fewer (XXBL: K1K3K1, K1K5K1 ×3, K1K7K1 ×2).
    A ``SuperConv*`` block only changes its width, with ``sub_layers`` 1 (``fix_k1_conv``: the 1x1 conv
    before the classifier keeps its width, the IDW space's "fixfc").
    """

    name: str
    block_groups: tuple[tuple[str, ...], ...]
    max_channels: int | None = None
    fix_k1_conv: bool = False

    def block_type_names(self) -> list[str]:
        return [n for group in self.block_groups for n in group]

    def channel_choices(self, channels: int) -> list[int]:
        xs = [channels * r for r in _RATIOS]
        if self.max_channels is not None:
            xs = [min(self.max_channels, max(8, x)) for x in xs]
        else:
            xs = [max(8, x) for x in xs]
        return sorted({smart_round(x, base=8) for x in xs}, reverse=True)

    @staticmethod
    def sublayer_choices(sub_layers: int) -> list[int]:
        return sorted({max(0, round(x)) for x in (sub_layers, sub_layers + 1, sub_layers + 2,
                                                   sub_layers - 1, sub_layers - 2)}, reverse=True)

    def gen_search_space(self, specs: Sequence[BlockSpec], block_id: int) -> list[list[str]]:
        """Candidate replacements of ``specs[block_id]`` as lists of block strings (the original's return value)."""
        return [list(lst) for lst in self._candidates(specs[block_id])]

    @functools.lru_cache(maxsize=4096)
    def _pool(self, block: BlockSpec) -> tuple[str, ...]:
        """The flattened candidate lists (with their repetitions): what the original draws from uniformly."""
        return tuple(s for lst in self._candidates(block) for s in lst)

    @functools.lru_cache(maxsize=4096)
    def _candidates(self, block: BlockSpec) -> tuple[tuple[str, ...], ...]:
        if isinstance(block, SuperConvKXBNRELU):
            if self.fix_k1_conv and block.kernel_size == 1:
                widths = [block.out_channels]
            else:
                widths = self.channel_choices(block.out_channels)
            name = block.token_name()
            return (tuple(_unique(f"{name}({block.in_channels},{w},{block.stride},1)" for w in widths)),)
        if not isinstance(block, SuperResBlock):
            raise RetiaError(f"space {self.name}: cannot mutate {block.to_string()!r} (not a residual super block)")
        # the original re-rounds each width and drops those below 8 or with 0 sub-layers; the choices are
        # already multiples of 8 (>= 8), so only the sub-layer filter has an effect
        combos = [(out, depth, btl) for out, depth, btl in itertools.product(
            self.channel_choices(block.out_channels), self.sublayer_choices(block.sub_layers),
            self.channel_choices(block.bottleneck_channels)) if depth > 0]
        head, stride = block.in_channels, block.stride
        lists: list[list[str]] = []
        for group in self.block_groups:
            acc: list[str] = []
            for type_name in group:
                acc += [f"{type_name}({head},{out},{stride},{btl},{depth})" for out, depth, btl in combos]
                acc = _unique(acc)
                # the same list object is appended and then extended by the next type (as in the original)
                lists.append(acc)
        return tuple(tuple(lst) for lst in lists)


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


_SPACES: dict[str, SearchSpace | Callable] = {
    "XXBL": SearchSpace(
        "XXBL",
        (("SuperResK1K3K1", "SuperResK1K5K1", "SuperResK1K7K1"), ("SuperResK3K3", "SuperResK5K5", "SuperResK7K7")),
        max_channels=2048,
    ),
    "IDW": SearchSpace(
        "IDW",
        (tuple(f"SuperResIDWE{e}K{k}" for k in (3, 5, 7) for e in (1, 2, 4, 6)),),
        fix_k1_conv=True,
    ),
}
SPACES = ("XXBL", "IDW")


def register_space(name: str, space: SearchSpace | Callable[[list[BlockSpec], int], list[list[str]]],
                   *, replace: bool = False) -> None:
    """Register a search space: a :class:`SearchSpace` or a function ``gen_search_space(specs, block_id)``
    returning lists of candidate block strings (the original's interface)."""
    if name in _SPACES and not replace:
        raise RetiaError(f"search space {name!r} already exists (pass replace=True)")
    if not (isinstance(space, SearchSpace) or callable(space)):
        raise RetiaError(f"search space {name!r} must be a SearchSpace or a callable")
    if isinstance(space, SearchSpace):
        for t in space.block_type_names():
            get_block_type(t)
    _SPACES[name] = space


def get_space(space: str | SearchSpace | Callable) -> SearchSpace | Callable:
    if isinstance(space, SearchSpace) or callable(space):
        return space
    try:
        return _SPACES[space]
    except (KeyError, TypeError):
        raise RetiaError(f"unknown search space {space!r}: expected one of {', '.join(_SPACES)}") from None


def candidate_blocks(structure: Structure, block_id: int, space: str | SearchSpace = "XXBL") -> list[list[str]]:
    """The original ``gen_search_space(block_list, block_id)`` for a structure: lists of candidate block strings."""
    specs = _specs(structure)
    if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < len(specs):
        raise RetiaError(f"block_id must be in [0, {len(specs) - 1}], got {block_id!r}")
    sp = get_space(space)
    gen = sp.gen_search_space if isinstance(sp, SearchSpace) else sp
    return gen(specs, block_id)


def split(structure: Structure, threshold: int = 6) -> str:
    """The original's ``split``: residual super blocks with ``sub_layers >= threshold`` become two blocks,
    the first with ``threshold // 2`` sub-layers and the stride, the second with the rest."""
    out: list[BlockSpec] = []
    for b in _specs(structure):
        out += b.split(threshold) if isinstance(b, SuperBlock) else [b]
    return to_string(out)


def fix_channels(structure: Structure) -> str:
    """Give every block the output channels of the block before it as input channels."""
    specs = _specs(structure)
    for i in range(1, len(specs)):
        if specs[i].in_channels != specs[i - 1].out_channels:
            specs[i] = specs[i].with_in_channels(specs[i - 1].out_channels)
    return to_string(specs)


def _mutate_original(specs: list[BlockSpec], space, rng: random.Random, num_replaces: int) -> list[BlockSpec]:
    gen = space.gen_search_space if isinstance(space, SearchSpace) else space
    chosen: set[int] = set()
    for _ in range(num_replaces):
        i = rng.randint(0, len(specs) - 1)
        if i in chosen:
            continue
        chosen.add(i)
        if isinstance(space, SearchSpace):
            pool = space._pool(specs[i])
        else:
            pool = [s for lst in gen(specs, i) for s in lst]
        if not pool:
            raise RetiaError(f"search space gives no candidate for {specs[i].to_string()!r}")
        new = parse_block(rng.choice(pool))
        if i > 0:
            new = new.with_in_channels(specs[i - 1].out_channels)
        specs[i] = new
    last = specs[0].out_channels
    for j in range(1, len(specs)):
        specs[j] = specs[j].with_in_channels(last)
        last = specs[j].out_channels
    return specs


def _adlik_channels(channels: int, ratio: float) -> int:
    return min(smart_round(channels * ratio, base=8), 2048)


def _mutate_adlik(specs: list[BlockSpec], space: SearchSpace, rng: random.Random, num_replaces: int) -> list[BlockSpec]:
    if not isinstance(space, SearchSpace):
        raise RetiaError("method='adlik' needs a SearchSpace (its block types), not a gen_search_space function")
    pool = [get_block_type(n) for n in _unique(space.block_type_names())]
    chosen: set[int] = set()
    for _ in range(num_replaces):
        i = rng.randint(0, len(specs) - 1)
        if i in chosen:
            continue
        chosen.add(i)
        block = specs[i]
        ratio = rng.choice(_RATIOS)
        if isinstance(block, SuperConvKXBNRELU):
            new: BlockSpec = type(block)(block.in_channels, _adlik_channels(block.out_channels, ratio), block.stride, 1)
        elif isinstance(block, SuperResBlock):
            cls = rng.choice(pool)
            out = _adlik_channels(block.out_channels, ratio)
            btl = min(_adlik_channels(block.bottleneck_channels, ratio), 512)
            depth = max(1, block.sub_layers + rng.choice((-2, -1, 0, 1, 2)))
            new = cls(block.in_channels, out, block.stride, btl, depth)
        else:
            raise RetiaError(f"cannot mutate {block.to_string()!r} (not a super block)")
        if i < len(specs) - 1:
            specs[i + 1] = specs[i + 1].with_in_channels(new.out_channels)
        specs[i] = new
    return specs


def mutate(structure: Structure, space: str | SearchSpace = "XXBL", rng: RngLike = None, *,
           num_replaces: int = 1, method: str = "original", split_threshold: int = 6) -> str:
    """A mutated copy of ``structure``.

    ``method='original'`` (``get_new_random_structure_str``): ``num_replaces`` times, draw a block index
    uniformly (an index drawn twice is skipped) and replace that block by a uniform draw from the
    flattened candidate lists of ``space``; then re-chain all input channels and ``split`` blocks with
    ``sub_layers >= split_threshold``. The original search uses ``num_replaces=1`` while the population has
    at most 10 members (mutating its initial structure), 2 afterwards, and splits the result once more.

    ``method='adlik'`` (the Adlik fork's default): the drawn block keeps its input channels and stride;
    a width ratio r from {2.5, 2, 1.5, 1.25, 1, 1/1.25, 1/1.5, 1/2, 1/2.5} scales its output width (and its
    bottleneck, capped at 512), rounded to 8 and capped at 2048; a residual block also gets a type drawn
    uniformly from the space's block types and ``sub_layers + {-2..2}`` (at least 1); the next block takes
    the new width as input. Then ``split``.
    """
    specs = _specs(structure)
    r = _rng(rng)
    sp = get_space(space)
    if isinstance(num_replaces, bool) or not isinstance(num_replaces, int) or num_replaces < 1:
        raise RetiaError(f"num_replaces must be an integer >= 1, got {num_replaces!r}")
    if method == "original":
        specs = _mutate_original(specs, sp, r, num_replaces)
    elif method == "adlik":
        specs = _mutate_adlik(specs, sp, r, num_replaces)
    else:
        raise RetiaError(f"unknown mutation method {method!r}: expected 'original' or 'adlik'")
    return split(specs, split_threshold)


def random_structure(rng: RngLike = None, space: str | SearchSpace = "XXBL") -> str:
    """A random network as the Adlik fork initialises its population (``get_random_initialized_structure_str``).

    6 to 10 blocks: ``SuperConvK3BNRELU(3,32,2,1)``, then residual blocks of types drawn uniformly from the
    space, widths and bottlenecks drawn from {8, 16, ..., 120}, one sub-layer, then a ``SuperConvK1BNRELU``
    of a random width. Blocks 0-3 and block ``round((L+2)/2)`` have stride 2 (L = number of blocks).
    """
    r = _rng(rng)
    sp = get_space(space)
    if not isinstance(sp, SearchSpace):
        raise RetiaError("random_structure needs a SearchSpace (its block types)")
    pool = _unique(sp.block_type_names())
    widths = [8 * i for i in range(1, 16)]
    n = r.randint(6, 10)
    parts = []
    c_in = 3
    for i in range(n):
        stride = 2 if i <= 3 or i == round((3 + n - 1) / 2) else 1
        if i == 0:
            parts.append(f"SuperConvK3BNRELU({c_in},32,{stride},1)")
            c_in = 32
        elif i == n - 1:
            parts.append(f"SuperConvK1BNRELU({c_in},{r.choice(widths)},{stride},1)")
        else:
            out, btl = r.choice(widths), r.choice(widths)
            parts.append(f"{r.choice(pool)}({c_in},{out},{stride},{btl},1)")
            c_in = out
    return "".join(parts)


def to_dict(structure: Structure) -> dict[str, Any]:
    """A JSON-friendly view that maps 1:1 to the string: ``{"blocks": [{"type": ..., <field>: int, ...}, ...]}``."""
    blocks = []
    for b in _specs(structure):
        if not all(isinstance(getattr(b, n), int) for n in b.arg_names()):
            raise RetiaError(f"to_dict handles blocks with integer arguments only, not {b.to_string()!r}")
        blocks.append({"type": b.token_name(), **{n: getattr(b, n) for n in b.arg_names()}})
    return {"blocks": blocks}


def from_dict(d: dict[str, Any]) -> str:
    """The structure string of a :func:`to_dict` view."""
    try:
        blocks = d["blocks"]
        specs = []
        for item in blocks:
            item = dict(item)
            cls = get_block_type(item.pop("type"))
            specs.append(cls(**item))
    except (KeyError, TypeError) as exc:
        raise RetiaError(f"not a structure dict ({exc}): expected {{'blocks': [{{'type': ..., ...}}]}}") from None
    return to_string(specs)
