"""The Zen-NAS search space as an NNI model space whose single mutable is the structure string.

Zen-NAS does not search over a fixed set of choices: its evolution edits a PlainNet structure string (replace a
block by a wider/narrower/deeper one, re-chain the channels, split deep blocks). So the NNI space here has exactly
one mutable, :class:`StructureString`, whose value is that string, and a sample is ``{"structure": "<string>"}``.
Every NNI component works with it:

* ``ZenNASModelSpace(...)`` is an ``nni.nas.nn.pytorch.ModelSpace``: ``NasExperiment`` converts it to NNI's raw
  (sequential engine) or simplified (training-service engine, trials in other processes) format;
  ``space.freeze({"structure": s})`` — and NNI's ``model.executable_model()`` in a trial — is the plain
  :class:`retia.spaces.zennas.ZenNet` of ``s`` (with residual links unless ``no_reslink``).
* ``StructureString`` answers ``check_contains`` (a parseable, channel-consistent string), ``default`` (the
  space's initial structure), ``random`` (the Adlik fork's random network of the space's block types) and
  ``freeze``. ``grid`` is not defined (the space is not enumerable).

The evolution itself (mutations, budgets, population) is :class:`retia.strategies.zennas_evolution.ZenNASEvolution`.
"""
from __future__ import annotations

import random as _random
from typing import Any, Callable, Iterable

from nni.mutable import (LabeledMutable, Mutable, Sample, SampleMissingError, SampleValidationError,
                         ensure_frozen)
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.space import model_context
from torch import nn

from retia.errors import RetiaError
from retia.spaces import zennas

__all__ = ["StructureString", "ZenNASModelSpace", "structure_of_sample"]

DEFAULT_LABEL = "structure"


def _space_name(space: Any) -> str:
    if isinstance(space, str):
        zennas.get_space(space)  # one-line RetiaError for an unknown name
        return space
    raise RetiaError(f"search space must be the name of a registered space ({', '.join(zennas.SPACES)} or one "
                     f"registered with retia.spaces.zennas.register_space), got {type(space).__name__}")


class StructureString(LabeledMutable):
    """One NNI mutable whose value is a whole Zen-NAS structure string.

    ``space`` names the search space (``'XXBL'``, ``'IDW'`` or a registered one) whose mutations produce the
    values; ``initial`` is the default value (the original scripts' fixed initial structure). ``resolution`` and
    ``num_classes`` are the context the budgets of a search are counted in (``retia.spaces.zennas.analyze``).
    """

    def __init__(self, label: str = DEFAULT_LABEL, space: str = "XXBL", initial: str | None = None, *,
                 resolution: int = 32, num_classes: int = 100):
        if not isinstance(label, str) or not label:
            raise RetiaError(f"label must be a non-empty string, got {label!r}")
        self.label = label
        self.space = _space_name(space)
        if initial is None:
            initial = zennas.INITIAL_STRUCTURES["imagenet_flops" if space == "IDW" else "cifar"]
        # kept verbatim (the original's latency script has a channel mismatch that its first mutation repairs),
        # but it must parse
        zennas.parse(initial)
        self.initial = initial
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)

    # ---- NNI mutable protocol ----------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return f"label={self.label!r}, space={self.space!r}, initial={self.initial[:48]!r}..."

    def leaf_mutables(self, is_leaf: Callable[[Mutable], bool]) -> Iterable[LabeledMutable]:
        yield self  # a leaf whatever ``is_leaf`` says: the string cannot be split into smaller choices

    def check_contains(self, sample: Sample) -> SampleValidationError | None:
        if self.label not in sample:
            return SampleMissingError(self.label, list(sample))
        value = sample[self.label]
        if not isinstance(value, str):
            return SampleValidationError(f"{self.label}: expected a structure string, got {type(value).__name__}")
        try:
            zennas.check_channels(value)
        except RetiaError as err:
            return SampleValidationError(f"{self.label}: {err}")
        return None

    def freeze(self, sample: Sample) -> str:
        self.validate(sample)
        return sample[self.label]

    def default(self, memo: Sample | None = None) -> str:
        memo = {} if memo is None else memo
        if self.label not in memo:
            memo[self.label] = self.initial
        return memo[self.label]

    def random(self, memo: Sample | None = None, random_state=None) -> str:
        """A random network: the Adlik fork's random initial individual for a built-in space, else a mutation of
        the initial structure (``random_state``: a numpy ``RandomState``)."""
        memo = {} if memo is None else memo
        if self.label not in memo:
            seed = int(random_state.randint(2 ** 31 - 1)) if random_state is not None else None
            rng = _random.Random(seed)
            if isinstance(zennas.get_space(self.space), zennas.SearchSpace):
                memo[self.label] = zennas.random_structure(rng, self.space)
            else:
                memo[self.label] = zennas.mutate(self.initial, self.space, rng)
        return memo[self.label]

    def grid(self, memo: Sample | None = None, granularity: int | None = None):
        raise NotImplementedError("the Zen-NAS structure space cannot be enumerated: use an evolutionary strategy")

    def equals(self, other: Any) -> bool:
        return (isinstance(other, StructureString) and self.label == other.label and self.space == other.space
                and self.initial == other.initial and self.resolution == other.resolution
                and self.num_classes == other.num_classes)


def structure_of_sample(sample: Sample | None, label: str = DEFAULT_LABEL) -> str:
    """The structure string of an NNI sample (``{"structure": s}``); a one-line error when there is none."""
    if not sample or label not in sample or not isinstance(sample[label], str):
        raise RetiaError(f"expected an NNI sample holding a structure string under {label!r}, got {sample!r}")
    return sample[label]


class ZenNASModelSpace(ModelSpace):
    """A Zen-NAS search space for NNI: one :class:`StructureString` mutable; frozen, a :class:`ZenNet`.

    Arguments: ``space`` ('XXBL' / 'IDW' / registered), ``initial`` (structure string), ``num_classes``,
    ``resolution`` (the input size budgets are counted at), and the build options of the frozen network
    (``no_reslink`` — the original search scores networks without residual links — ``use_se``, ``dropout``).
    """

    def __init__(self, space: str = "XXBL", initial: str | None = None, num_classes: int = 100,
                 resolution: int = 32, *, label: str = DEFAULT_LABEL, no_reslink: bool = False,
                 use_se: bool = False, dropout: float | None = None):
        super().__init__()
        self.structure_mutable = self.add_mutable(
            StructureString(label, space, initial, resolution=resolution, num_classes=num_classes))
        self.num_classes, self.resolution = num_classes, resolution
        self.build_options = {"no_reslink": no_reslink, "use_se": use_se, "dropout": dropout}
        # a dry-run network (the initial structure) so that the space is a usable module; frozen samples are
        # built by create_fixed_module
        structure = ensure_frozen(self.structure_mutable, strict=False)
        self.network: nn.Module | None = None
        try:
            self.network = zennas.build(structure, num_classes, **self.build_options)
        except RetiaError:
            self.network = None  # e.g. the original's latency initial structure (mismatched channels)
        self.structure = structure

    @classmethod
    def create_fixed_module(cls, sample: dict, space: str = "XXBL", initial: str | None = None,
                            num_classes: int = 100, resolution: int = 32, *, label: str = DEFAULT_LABEL,
                            no_reslink: bool = False, use_se: bool = False, dropout: float | None = None):
        structure = structure_of_sample(sample, label)
        return zennas.build(structure, num_classes, no_reslink=no_reslink, use_se=use_se, dropout=dropout)

    def freeze(self, sample: Sample) -> nn.Module:
        """The :class:`ZenNet` of ``sample[label]`` (built with this space's options)."""
        self.structure_mutable.validate(sample)
        with model_context(sample):
            return self.__class__(*self.trace_args, **self.trace_kwargs)

    def forward(self, x):
        if self.network is None:
            raise RetiaError(f"the dry-run structure of this space does not build: {self.structure[:60]}...")
        return self.network(x)
