"""The PlainNet structure-string grammar: block specs (frozen dataclasses), the block registry, parse / format.

A structure string is a sequence of tokens ``Name(arg,arg,...)``, e.g.
``SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,1)SuperConvK1BNRELU(16,64,1,1)``. Every token names a
registered block type; a block type is a frozen dataclass subclass of :class:`BlockSpec` whose fields are the
token's integer arguments in order. Composite blocks (``ResBlock``, ``ResBlockProj``, ``Sequential``) hold
nested tokens. An optional label ``Name(label|args)`` is kept for round trips; whitespace is ignored.

``parse(s)`` gives the list of specs, ``to_string(specs)`` the identical string back (for a string without
whitespace). Errors are :class:`~retia.errors.RetiaError` with one line naming the offending token.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from retia.errors import RetiaError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "BlockSpec",
    "BuildOptions",
    "DEFAULT_OPTIONS",
    "block_types",
    "get_block_type",
    "parse",
    "parse_block",
    "register_block",
    "smart_round",
    "to_string",
    "unregister_block",
]

_REGISTRY: dict[str, type["BlockSpec"]] = {}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WS_RE = re.compile(r"\s+")


def smart_round(x: float, base: int | None = None) -> int:
    """Round ``x`` to a multiple of ``base`` (never below ``base``), Python's round-half-to-even included.

    Without ``base``: 32 above 256, 16 above 128, else 8 (the channel rounding of the original code).
    """
    if base is None:
        base = 32 if x > 256 else 16 if x > 128 else 8
    return max(base, round(x / float(base)) * base)


@dataclass(frozen=True)
class BuildOptions:
    """How super blocks expand: without BatchNorm, without residual links (as the search scores), with SE."""

    no_BN: bool = False
    no_reslink: bool = False
    use_se: bool = False


DEFAULT_OPTIONS = BuildOptions()


@dataclass(frozen=True)
class BlockSpec:
    """One token of a structure string. Subclasses are frozen dataclasses; their fields are the arguments.

    A block type provides ``in_channels``, ``out_channels`` and ``stride`` (as fields or properties) and:

    * ``out_resolution(res)``: the output side length the original's counting assumes (``res // stride``);
    * ``flops(res, opts)``: multiply-adds as the original's ``get_FLOPs`` counts them (BN included);
    * ``params(opts)``: parameters as the original's ``get_model_size`` counts them;
    * ``num_layers()``: the layers it adds to ``get_num_layers`` (super blocks: ``sub_layers``);
    * ``build(opts)``: a fresh ``nn.Module``;
    * ``with_in_channels(c)``: a copy taking ``c`` input channels (the original's ``set_in_channels``).

    ``args_to_string()`` / ``from_args(text)`` convert the part between the parentheses; the defaults handle
    a flat list of integers, one per dataclass field, in field order.
    """

    label: str | None = field(default=None, kw_only=True, compare=False, repr=False)

    # ---- grammar -------------------------------------------------------------------------------------
    @classmethod
    def token_name(cls) -> str:
        return cls.__name__

    @classmethod
    def arg_names(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_arg_names")
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "label")
            type.__setattr__(cls, "_arg_names", names)
        return names

    def args_to_string(self) -> str:
        return ",".join(str(getattr(self, n)) for n in self.arg_names())

    def to_string(self) -> str:
        prefix = f"{self.label}|" if self.label else ""
        return f"{self.token_name()}({prefix}{self.args_to_string()})"

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def from_args(cls, text: str, *, label: str | None, token: str) -> "BlockSpec":
        names = cls.arg_names()
        parts = text.split(",") if text else []
        if len(parts) != len(names):
            raise RetiaError(
                f"bad structure token {token!r}: {cls.token_name()} takes {len(names)} integers "
                f"({','.join(names)}), got {len(parts)}"
            )
        values = [_parse_int(p, token) for p in parts]
        return cls(*values, label=label)

    def _check_positive(self, *names: str, minimum: int = 1) -> None:
        for n in names:
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise RetiaError(
                    f"bad structure token {self.to_string()!r}: {n} must be an integer >= {minimum}, got {v!r}"
                )

    # ---- semantics (overridden by block types) --------------------------------------------------------
    def out_resolution(self, res: int) -> int:
        return res // self.stride

    def flops(self, res: int, opts: BuildOptions = DEFAULT_OPTIONS) -> float:
        raise NotImplementedError(f"{self.token_name()} does not define flops()")

    def params(self, opts: BuildOptions = DEFAULT_OPTIONS) -> int:
        raise NotImplementedError(f"{self.token_name()} does not define params()")

    def num_layers(self) -> int:
        return 0

    def build(self, opts: BuildOptions = DEFAULT_OPTIONS) -> "nn.Module":
        raise NotImplementedError(f"{self.token_name()} does not define build()")

    def with_in_channels(self, channels: int) -> "BlockSpec":
        return dataclasses.replace(self, in_channels=channels)


def _parse_int(text: str, token: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):
        raise RetiaError(f"bad structure token {token!r}: {text!r} is not an integer")
    return int(text)


# ---- registry ---------------------------------------------------------------------------------------------


def register_block(cls: type[BlockSpec] | None = None, *, replace: bool = False):
    """Register a block type under its class name so structure strings can use it (usable as a decorator).

    ``cls`` must be a dataclass subclass of :class:`BlockSpec` (usually of ``SuperBlock``). Registering a name
    that exists raises unless ``replace=True``.
    """

    def _register(c: type[BlockSpec]) -> type[BlockSpec]:
        if not (isinstance(c, type) and issubclass(c, BlockSpec) and dataclasses.is_dataclass(c)):
            raise RetiaError(f"register_block: {c!r} is not a dataclass subclass of BlockSpec")
        name = c.token_name()
        if not _NAME_RE.fullmatch(name):
            raise RetiaError(f"register_block: {name!r} is not a valid block name (letters, digits, _)")
        if name in _REGISTRY and _REGISTRY[name] is not c and not replace:
            raise RetiaError(f"register_block: block type {name!r} is already registered (pass replace=True)")
        _REGISTRY[name] = c
        _parse_cached.cache_clear()
        return c

    return _register if cls is None else _register(cls)


def unregister_block(name: str) -> None:
    """Remove a registered block type (for tests and experiments with custom blocks)."""
    _REGISTRY.pop(name, None)
    _parse_cached.cache_clear()


def block_types() -> dict[str, type[BlockSpec]]:
    """A copy of the registry: block name -> spec class."""
    return dict(_REGISTRY)


def get_block_type(name: str) -> type[BlockSpec]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RetiaError(f"unknown block type {name!r} (registered: see retia.spaces.zennas.block_types())") from None


# ---- parse / format ---------------------------------------------------------------------------------------


def _matching_paren(s: str, open_idx: int, end: int) -> int:
    depth = 0
    for i in range(open_idx, end):
        c = s[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _snippet(s: str, start: int, length: int = 40) -> str:
    text = s[start:start + length]
    return text + ("..." if start + length < len(s) else "")


def parse_list(s: str, start: int = 0, end: int | None = None) -> list[BlockSpec]:
    """Parse ``s[start:end]`` (whitespace already removed) into block specs."""
    end = len(s) if end is None else end
    specs: list[BlockSpec] = []
    pos = start
    while pos < end:
        m = _NAME_RE.match(s, pos, end)
        if m is None or m.end() >= end or s[m.end()] != "(":
            raise RetiaError(
                f"bad structure string at position {pos}: expected a block like 'Name(...)', got {_snippet(s, pos)!r}"
            )
        name = m.group(0)
        close = _matching_paren(s, m.end(), end)
        if close < 0:
            raise RetiaError(f"bad structure string: unbalanced '(' in {_snippet(s, pos)!r} (position {pos})")
        token = s[pos:close + 1]
        cls = _REGISTRY.get(name)
        if cls is None:
            raise RetiaError(
                f"bad structure token {token!r}: unknown block type {name!r} (see retia.spaces.zennas.block_types())"
            )
        inner = s[m.end() + 1:close]
        label = None
        bar = inner.find("|")
        if bar >= 0 and "(" not in inner[:bar]:
            label, inner = inner[:bar], inner[bar + 1:]
            if not label or not _NAME_RE.fullmatch(label):
                raise RetiaError(f"bad structure token {token!r}: bad label {label!r}")
        specs.append(cls.from_args(inner, label=label, token=token))
        pos = close + 1
    return specs


def parse(structure: str | Sequence[BlockSpec]) -> list[BlockSpec]:
    """Parse a structure string into a list of block specs (a list of specs is returned as a copy)."""
    if isinstance(structure, (list, tuple)):
        if not all(isinstance(b, BlockSpec) for b in structure):
            raise RetiaError("expected a structure string or a list of BlockSpec")
        if not structure:
            raise RetiaError("empty structure: expected at least one block")
        return list(structure)
    if not isinstance(structure, str):
        raise RetiaError(f"expected a structure string, got {type(structure).__name__}")
    return list(_parse_cached(structure))


@functools.lru_cache(maxsize=16384)
def _parse_cached(structure: str) -> tuple[BlockSpec, ...]:
    # specs are immutable, so a search that parses the same strings again and again shares them
    s = _WS_RE.sub("", structure)
    if not s:
        raise RetiaError("empty structure string: expected blocks like 'SuperConvK3BNRELU(3,8,1,1)...'")
    if ")" in s and s.count("(") != s.count(")"):
        # report the first stray ')' (a missing ')' is reported by parse_list with its token)
        depth = 0
        for i, c in enumerate(s):
            depth += c == "("
            depth -= c == ")"
            if depth < 0:
                near = _snippet(s, max(0, i - 30))
                raise RetiaError(f"bad structure string: unmatched ')' at position {i} in {near!r}")
    return tuple(parse_list(s))


def parse_block(token: str) -> BlockSpec:
    """Parse a string holding exactly one block."""
    specs = parse(token)
    if len(specs) != 1:
        raise RetiaError(f"expected exactly one block, got {len(specs)} in {token!r}")
    return specs[0]


def to_string(specs: Iterable[BlockSpec] | BlockSpec | str) -> str:
    """The structure string of ``specs`` (one spec or a list; a string is parsed and formatted, i.e. normalised)."""
    if isinstance(specs, BlockSpec):
        return specs.to_string()
    if isinstance(specs, str):
        specs = parse(specs)
    return "".join(b.to_string() for b in specs)
