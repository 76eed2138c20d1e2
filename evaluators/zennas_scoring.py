"""Scoring Zen-NAS candidates fast: the evaluator of :class:`retia.strategies.zennas_evolution.ZenNASEvolution`.

``score_structure(structure, proxy, seed=...)`` gives the same number as the matching
:mod:`retia.evaluators.zero_shot` proxy on the network the original search scores (``build(structure,
num_classes, no_reslink=True)``), but the Zen-score — the one a search computes hundreds of thousands of times —
takes a faster route (:func:`fast_zen_score`):

* no ``nn.Module`` is built: the structure is compiled once into a flat chain of conv / BN / ReLU steps (the
  super blocks' own ``expand()``; cached per string), whose weights are drawn straight into tensors in the order
  ``gaussian_init_`` would draw them, so a seed gives the numbers ``zen_score(model, seed=seed)`` gives;
* ``torch.inference_mode``, in-place ReLU, and channels-last tensors (oneDNN's fast convolution/BatchNorm path
  on CPUs; ``channels_last=False`` reproduces ``zen_score`` bit for bit, channels-last agrees to float32
  rounding: |Δ| < 0.1 on ZenNet-1M, whose score changes by ~1 from seed to seed);
* :func:`release_freed_memory` (glibc ``malloc_trim`` after a candidate once the resident memory has grown by
  :data:`KEEP_FREE_BYTES` since the last trim): without it the heap fragments over candidates of changing widths and the resident memory of a
  search grows by hundreds of MB;
* weights and inputs drawn from a private ``torch.Generator`` seeded per candidate (no save/restore of the
  global RNG state per candidate).

A structure the chain compiler does not know (SE, custom blocks) falls back to building the module.
A failing or non-finite score becomes ``FAILED_SCORE`` (-9999, the original search's value for a failure).

:class:`ZenNASScorer` is the NNI evaluator: it reads the candidate's structure string from the NNI sample
(``ExecutableModelSpace.sample``), so neither NNI nor the scorer builds the module twice, scores it, and reports
the score with ``nni.report_final_result``. It is a ``FunctionalEvaluator`` (serialisable), so it also runs in
NNI trial processes (training-service engine, ``trial_concurrency``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import nni
import torch
import torch.nn.functional as F
from nni.nas.evaluator import FunctionalEvaluator
from torch import nn

from retia.errors import RetiaError
from retia.evaluators import zero_shot
from retia.spaces import zennas
from retia.spaces.zennas.blocks import BN, RELU, ConvDW, ConvKX
from retia.spaces.zennas.grammar import BuildOptions
from retia.spaces.zennas.super_blocks import SuperBlock

__all__ = ["FAILED_SCORE", "KEEP_FREE_BYTES", "ZenNASScorer", "candidate_seed", "chain_plan", "fast_zen_score",
           "release_freed_memory", "resident_bytes", "score_structure"]

_logger = logging.getLogger(__name__)

#: the score of a candidate whose scoring failed (the original search's value)
FAILED_SCORE = -9999.0
BN_EPS = 1e-3        # retia.spaces.zennas ZenNet BatchNorm eps (the original's)
BN_MOMENTUM = 0.1    # nn.BatchNorm2d default
_SCORING_OPTIONS = BuildOptions(no_reslink=True)
_libc = None  # glibc, once loaded; False where there is none


#: how far the resident memory may grow over its size after the last trim before :func:`release_freed_memory`
#: trims again
KEEP_FREE_BYTES = 96 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_rss_after_trim: int | None = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                _libc = ctypes.CDLL("libc.so.6")
                _libc.malloc_trim  # noqa: B018 (musl has none)
            except (OSError, AttributeError):
                _libc = False
    return _libc


def resident_bytes() -> int | None:
    """The process's resident memory now (``/proc/self/statm``); None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def release_freed_memory(keep_bytes: int = 0) -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``) once the resident memory has grown by
    more than ``keep_bytes`` since the last trim; True when it trimmed.

    Candidates of different widths free and allocate activation blocks of ever-changing sizes; glibc keeps the
    freed ones (its mmap threshold grows after large frees) and the process's resident memory creeps up by
    hundreds of MB over a search. Trimming bounds that; trimming after *every* candidate costs the next one its
    page faults again (~15 ms of system time per candidate in ``benchmarks/zennas_search.py``), so the scorer lets
    the resident memory grow by :data:`KEEP_FREE_BYTES` first.
    """
    global _rss_after_trim
    libc = _glibc()
    if libc is False:
        return False
    if keep_bytes > 0 and _rss_after_trim is not None:
        rss = resident_bytes()
        if rss is not None and rss - _rss_after_trim <= keep_bytes:
            return False
    trimmed = bool(libc.malloc_trim(0))
    _rss_after_trim = resident_bytes()
    return trimmed


def candidate_seed(structure: str, seed: int | None) -> int | None:
    """The seed a candidate is scored with: a stable hash of (search seed, structure string), so a score does not
    depend on evaluation order, concurrency or resumption. ``None`` stays ``None`` (global RNG)."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{int(seed)}|{structure}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# ---- the chain compiler ---------------------------------------------------------------------------------------

# a step: ("conv", in, out, kernel, stride, groups) | ("bn", channels) | ("relu",)
Step = tuple


@functools.lru_cache(maxsize=4096)
def chain_plan(structure: str, num_classes: int = 100) -> tuple[tuple[Step, ...], tuple[int, int]] | None:
    """The network ``build(structure, num_classes, no_reslink=True)`` as a flat chain of steps, in module order,
    and the classifier's weight shape; ``None`` when it holds a layer the chain does not model (SE, MaxPool,
    custom blocks)."""
    steps: list[Step] = []
    for spec in zennas.check_channels(structure):
        basics = spec.expand(_SCORING_OPTIONS) if isinstance(spec, SuperBlock) else [spec]
        for b in basics:
            if isinstance(b, ConvKX):
                if b.in_channels % b.groups or b.out_channels % b.groups:
                    return None
                steps.append(("conv", b.in_channels, b.out_channels, b.kernel_size, b.stride, b.groups))
            elif isinstance(b, ConvDW):
                steps.append(("conv", b.channels, b.channels, b.kernel_size, b.stride, b.channels))
            elif isinstance(b, BN):
                steps.append(("bn", b.channels))
            elif isinstance(b, RELU):
                steps.append(("relu",))
            else:
                return None
    last = zennas.parse(structure)[-1].out_channels
    return tuple(steps), (num_classes, last)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _fork_rng(device: torch.device):
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def _forward(steps, weights, stats, x: torch.Tensor) -> torch.Tensor:
    """The chain on ``x``; BatchNorm (train mode, running statistics updated) and ReLU work in place on the
    convolution's output, so a layer allocates one tensor, not three."""
    wi = bi = 0
    if steps and steps[0][0] != "conv":  # in-place steps must not touch the caller's input
        x = x.clone()
    for step in steps:
        kind = step[0]
        if kind == "conv":
            _, _, _, k, stride, groups = step
            x = F.conv2d(x, weights[wi], None, stride, (k - 1) // 2, 1, groups)
            wi += 1
        elif kind == "bn":
            mean, var = stats[bi]
            # the statistics are taken before the elementwise transform writes: the values of F.batch_norm (the
            # tests check it bit for bit)
            torch.native_batch_norm(x, None, None, mean, var, True, BN_MOMENTUM, BN_EPS,
                                    out=(x, torch.empty_like(mean), torch.empty_like(mean)))
            bi += 1
        else:
            torch.relu_(x)
    return x


_split_threads: int | None = None  # the process's torch thread budget while passes run in parallel


def _passes_in_parallel(parallel: bool | None, channels_last: bool, device: torch.device) -> bool:
    """Whether the two passes run on two threads. Deciding so halves ``torch.get_num_threads()`` for the process
    (once: switching the thread count per call costs milliseconds); deciding against it later restores it."""
    global _split_threads
    budget = _split_threads or torch.get_num_threads()
    use = (channels_last and device.type == "cpu" and budget >= 2) if parallel is None else bool(parallel)
    if use and _split_threads is None:
        _split_threads = budget
        torch.set_num_threads(max(1, budget // 2))
    elif not use and _split_threads is not None:
        torch.set_num_threads(_split_threads)
        _split_threads = None
    return use


_pass_worker: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _pass_worker
    if _pass_worker is None:
        _pass_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zen-pass")
    return _pass_worker


def _second_pass(steps, weights, stats, x):
    with torch.inference_mode():
        return _forward(steps, weights, stats, x)


def fast_zen_score(structure: str, resolution: int = 32, batch_size: int = 64, mixup_gamma: float = 1e-2,
                   repeat: int = 1, seed: int | None = None, *, num_classes: int = 100, in_channels: int = 3,
                   channels_last: bool = True, parallel: bool | None = None,
                   device: str | torch.device | None = "cpu", return_info: bool = False) -> float | dict:
    """The Zen-score of ``structure`` as :func:`retia.evaluators.zero_shot.zen_score` computes it on
    ``build(structure, num_classes, no_reslink=True)`` — without building the module (see the module docstring).

    With ``channels_last=False`` the value equals ``zen_score(build(...), seed=seed)`` bit for bit; with
    channels-last it agrees to float32 rounding. ``parallel`` runs the two forward passes (``x`` and
    ``x + gamma * eps``) at the same time on two threads, each with half of ``torch.get_num_threads()``
    (default: when that is >= 2, channels-last, CPU): the BatchNorm running statistics of the two passes are then
    combined into exactly the update the sequential passes make (up to float rounding).
    """
    zero_shot._check_common(resolution, batch_size, in_channels, seed)
    zero_shot._check_int("repeat", repeat)
    plan = chain_plan(structure, num_classes)
    dev = _device(device)
    if plan is None:  # not a plain chain: build the module
        model = zero_shot.build_for_scoring(structure, num_classes).to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return zero_shot.zen_score(model, resolution, batch_size, mixup_gamma, repeat, seed, num_classes=num_classes,
                                   in_channels=in_channels, inplace=True, return_info=return_info)
    steps, head_shape = plan
    if steps and steps[0][0] == "conv" and steps[0][1] != in_channels:
        raise RetiaError(f"structure takes {steps[0][1]} input channels, not in_channels={in_channels}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch_size, in_channels, resolution, resolution)
    stats = [(torch.zeros(s[1], device=dev), torch.ones(s[1], device=dev)) for s in steps if s[0] == "bn"]
    parallel = _passes_in_parallel(parallel, channels_last, dev)
    scores = []
    # a private generator seeded like torch.manual_seed(seed) seeds the device's: the same draws, without saving and
    # restoring the global RNG state per candidate
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    with torch.inference_mode():
        for _ in range(repeat):
            # the draws of gaussian_init_ (conv weights in module order, then the classifier), then x and eps
            weights = [torch.randn((s[2], s[1] // s[5], s[3], s[3]), device=dev, generator=gen)
                       for s in steps if s[0] == "conv"]
            torch.randn(head_shape, device=dev, generator=gen)
            x = torch.randn(shape, device=dev, generator=gen)
            eps = torch.randn(shape, device=dev, generator=gen)
            mixed = x + mixup_gamma * eps
            if channels_last:
                weights = [w.contiguous(memory_format=fmt) for w in weights]
                x, mixed = x.contiguous(memory_format=fmt), mixed.contiguous(memory_format=fmt)
            if parallel:
                start = [(m.clone(), v.clone()) for m, v in stats]
                other = [(m.clone(), v.clone()) for m, v in stats]
                future = _worker().submit(_second_pass, steps, weights, other, mixed)
                out = _forward(steps, weights, stats, x)
                out_mix = future.result()
                keep = 1.0 - BN_MOMENTUM
                for (m, v), (m2, v2), (m0, v0) in zip(stats, other, start):
                    # sequential passes: s <- keep*s + (1-keep)*batch_1, then s <- keep*s + (1-keep)*batch_2;
                    # the second pass alone gave s2 = keep*s0 + (1-keep)*batch_2
                    m.mul_(keep).add_(m2).sub_(m0, alpha=keep)
                    v.mul_(keep).add_(v2).sub_(v0, alpha=keep)
            else:
                out = _forward(steps, weights, stats, x)
                out_mix = _forward(steps, weights, stats, mixed)
            diff = torch.abs(out - out_mix).flatten(1).sum(dim=1).mean()
            del out, out_mix
            log_bn = 0.0
            for _, var in stats:
                log_bn = log_bn + torch.log(torch.sqrt(torch.mean(var)))
            scores.append(float(torch.log(diff) + log_bn))
    avg = float(sum(scores) / len(scores))
    if not return_info:
        return avg
    std = float(torch.tensor(scores, dtype=torch.float64).std(unbiased=False))
    return {"avg_nas_score": avg, "std_nas_score": std, "avg_precision": 1.96 * std / math.sqrt(len(scores)),
            "scores": scores}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- any proxy ------------------------------------------------------------------------------------------------

_CANONICAL = {fn: name for name, fn in zero_shot.PROXIES.items()}


def proxy_name(proxy: str) -> str:
    """The canonical proxy name (a key of ``zero_shot.PROXIES``) of any accepted spelling."""
    return _CANONICAL[zero_shot.get_proxy(proxy)]


def score_structure(structure: str, proxy: str = "zen", *, resolution: int = 32, batch_size: int = 64,
                    seed: int | None = None, num_classes: int = 100, mixup_gamma: float = 1e-2, repeat: int = 1,
                    channels_last: bool = True, parallel: bool | None = None,
                    device: str | torch.device | None = None) -> float:
    """Score one candidate with a zero-shot proxy (any key of ``retia.evaluators.zero_shot.PROXIES``), on the
    network the original search scores (residual links removed). ``seed`` is the search seed; the candidate's own
    seed is :func:`candidate_seed`. A failure (e.g. out of memory) or a non-finite score gives ``FAILED_SCORE``."""
    name = proxy_name(proxy)
    cseed = candidate_seed(structure, seed)
    dev = _device(device)
    try:
        if name == "zen":
            score = fast_zen_score(structure, resolution, batch_size, mixup_gamma, repeat, cseed,
                                   num_classes=num_classes, channels_last=channels_last, parallel=parallel,
                                   device=dev)
        elif name in ("flops", "params"):
            score = zero_shot.PROXIES[name](structure, resolution, batch_size, num_classes=num_classes)
        elif name == "random":
            score = zero_shot.random_score(structure, resolution, batch_size, seed=cseed)
        else:
            with _fork_rng(dev) if cseed is not None else _nullcontext():
                if cseed is not None:
                    torch.manual_seed(cseed)
                model = zero_shot.build_for_scoring(structure, num_classes).to(dev)
            score = zero_shot.PROXIES[name](model, resolution, batch_size, seed=cseed, num_classes=num_classes,
                                            inplace=True)
    except RetiaError:
        raise
    except (RuntimeError, ValueError, MemoryError, torch.OutOfMemoryError) as err:
        _logger.warning("scoring failed (%s: %s) for %s", type(err).__name__, str(err).splitlines()[0][:200],
                        structure)
        return FAILED_SCORE
    score = float(score)
    return score if math.isfinite(score) else FAILED_SCORE


class ZenNASScorer(FunctionalEvaluator):
    """NNI evaluator scoring Zen-NAS candidates with a zero-shot proxy (see the module docstring).

    ``ZenNASScorer(proxy='zen', resolution=32, batch_size=64, num_classes=100, seed=0, mixup_gamma=1e-2,
    repeat=1, channels_last=True, parallel=None, device=None, label='structure', release_memory=True)``
    (``parallel``: the two Zen-score passes on two threads, see :func:`fast_zen_score`). ``evaluate(x)`` takes a
    structure string or a ZenNet (its ``structure``), reports the score to NNI and returns it; calling the
    scorer scores without reporting.
    """

    _traced: ClassVar[bool] = True

    def __init__(self, proxy: str = "zen", *, resolution: int = 32, batch_size: int = 64, num_classes: int = 100,
                 seed: int | None = 0, mixup_gamma: float = 1e-2, repeat: int = 1, channels_last: bool = True,
                 parallel: bool | None = None, device: str | None = None, label: str = "structure",
                 release_memory: bool = True):
        name = proxy_name(proxy)
        zero_shot._check_common(resolution, batch_size, 3, seed)
        zero_shot._check_int("num_classes", num_classes)
        zero_shot._check_int("repeat", repeat)
        super().__init__(score_structure, proxy=name, resolution=resolution, batch_size=batch_size,
                         num_classes=num_classes, seed=seed, mixup_gamma=mixup_gamma, repeat=repeat,
                         channels_last=channels_last, parallel=parallel, device=device)
        self.label, self.release_memory = label, release_memory

    @property
    def proxy(self) -> str:
        return self.arguments["proxy"]

    @property
    def trace_kwargs(self):
        return {**self.arguments, "label": self.label, "release_memory": self.release_memory}

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.trace_kwargs.items())

    def _structure(self, model: Any) -> str:
        if isinstance(model, str):
            return model
        structure = getattr(model, "structure", None)
        if isinstance(model, nn.Module) and isinstance(structure, str):
            return structure
        raise RetiaError(f"ZenNASScorer scores a structure string or a ZenNet, got {type(model).__name__}")

    def __call__(self, model: Any) -> float:
        """Score without reporting to NNI."""
        score = score_structure(self._structure(model), **self.arguments)
        if self.release_memory:
            release_freed_memory(KEEP_FREE_BYTES)
        return score

    def evaluate(self, model: Any) -> float:
        score = self(model)
        nni.report_final_result(score)
        return score

    def _execute(self, model) -> float:
        # NNI hands the frozen candidate (an ExecutableModelSpace): its sample holds the structure string, so the
        # network is never instantiated as a module here (the scorer compiles what it needs).
        from retia.spaces.zennas_nni import structure_of_sample

        return self.evaluate(structure_of_sample(getattr(model, "sample", None), self.label))
