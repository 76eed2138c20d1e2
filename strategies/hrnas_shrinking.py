"""HR-NAS progressive shrinking: resource-aware L1 penalty on BN scales, periodic physical shrinking.

The search trains the supernet with an L1 penalty on the scale γ of the BN after every depthwise conv (one per
hidden channel of each kernel branch) and on the BN after each transformer's token projection (one per token).
Each channel is weighted by the multiply-adds it costs (1x1 expand + depthwise + 1x1 projection), each token by
its linear cost plus the marginal cost of its attention products (a + b·(n² − (n−1)²) for the n tokens alive),
all divided by one normaliser: the mean cost of a prunable unit in the initial supernet (total prunable MACs /
number of units; the original's rule). The weight ρ rises linearly from ``epoch_free`` to ``epoch_warmup``.
Every ``interval`` epochs (and at the last) the channels / tokens with |γ| below ``threshold`` are removed: a new,
smaller plain network is built with the kept weights copied (the removed channels' constant contribution folded
into the next BN, see :func:`retia.spaces.hrnas.network.slice_state`), the optimizer's parameters and state
(Adam moments, momentum) are sliced the same way, and training goes on with it.

Design: the mechanics are a Lightning callback (:class:`ProgressiveShrinking`) — the penalty's subgradient
ρ·penalty·sign(γ) is added to the gradients just before each optimizer step (what the original gets by adding the
term to the loss; it then goes through the same optimizer — the original's RMSprop / AdamW / Adam, retia's AdamW —
and BN scales get no weight decay, as the original's ``mnas`` rule), so it works with any task's Lightning module
(classification today, segmentation / keypoints later) without touching its loss; the NNI strategy
(:class:`ProgressiveShrinkingStrategy`, a ``nni.nas.strategy.base.Strategy``) attaches it to the experiment's
Lightning evaluator, trains ``space.network`` once, and leaves the searched network in the space. Shrinking
is one training run, not a stream of sampled trials, so the strategy runs it in process (like NNI's one-shot
strategies) and reports one model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
from nni.nas.strategy.base import Strategy
from torch import nn

from ..errors import RetiaError
from ..spaces.hrnas import network as hnet

_logger = logging.getLogger(__name__)
EPS = 1e-5  # the original's guard in the normaliser's denominator

__all__ = ["ResourcePenalty", "rho_schedule", "shrink_keep", "shrink", "remap_optimizer", "ProgressiveShrinking",
           "ProgressiveShrinkingStrategy"]


class ResourcePenalty:
    """Per-unit penalties of a network (computed once, on the initial supernet, as the original).

    ``channel_penalty(block, k)`` = MACs of one hidden channel of that kernel branch / normaliser;
    ``token_penalty(block, n)`` = (a + b·(n² − (n−1)²)) / normaliser for a transformer with n tokens alive.
    """

    def __init__(self, net: hnet.HRNet):
        self.config = net.config
        total_macs, total_units = 0, 0
        self.channel_macs: dict[tuple[str, int], int] = {}
        self.token_terms: dict[str, tuple[int, int]] = {}
        for name, block in net.named_blocks():
            for k in net.config["kernel_sizes"]:
                self.channel_macs[(name, k)] = hnet.branch_macs_per_channel(block.spec, k)
            for k, c in zip(block.kernel_sizes, block.channels):
                total_macs += self.channel_macs[(name, k)] * c
                total_units += c
            if block.spec.transformer:
                self.token_terms[name] = hnet.transformer_macs_terms(block.spec.inp, net.config["token_size"])
                if block.transformer is not None:
                    n = block.transformer.tokens
                    total_macs += hnet.transformer_macs(block.spec.inp, n, net.config["token_size"])
                    total_units += n
        if total_units == 0:
            raise RetiaError("HR-NAS penalty: the network has no prunable channels or tokens")
        self.normalizer = total_macs / (total_units + EPS)

    def channel_penalty(self, block: str, kernel: int) -> float:
        return self.channel_macs[(block, kernel)] / self.normalizer

    def token_penalty(self, block: str, alive: int) -> float:
        a, b = self.token_terms[block]
        return (a + b * (alive ** 2 - max(alive - 1, 0) ** 2)) / self.normalizer

    def terms(self, net: hnet.HRNet, threshold: float) -> list[tuple[torch.Tensor, float]]:
        """``(γ parameter, penalty)`` for every penalised BN of ``net`` now."""
        out = []
        for name, block in net.named_blocks():
            for k, bn in block.depthwise_bns().items():
                out.append((bn.weight, self.channel_penalty(name, k)))
            if block.transformer is not None:
                gamma = block.transformer.input_norm.weight
                alive = int((gamma.detach().abs() > threshold).sum())
                out.append((gamma, self.token_penalty(name, alive)))
        return out

    def value(self, net: hnet.HRNet, threshold: float = 1e-3) -> torch.Tensor:
        """Σ penalty · Σ|γ| (multiply by ρ for the loss term); differentiable."""
        total = torch.zeros(())
        for gamma, pen in self.terms(net, threshold):
            total = total + pen * gamma.abs().sum()
        return total

    @torch.no_grad()
    def add_grad(self, net: hnet.HRNet, rho: float, threshold: float = 1e-3) -> float:
        """Add the (sub)gradient of ρ·:meth:`value` to the γ gradients; returns ρ·value."""
        total = 0.0
        for gamma, pen in self.terms(net, threshold):
            if gamma.grad is None:
                gamma.grad = torch.zeros_like(gamma)
            gamma.grad.add_(torch.sign(gamma), alpha=rho * pen)
            total += rho * pen * float(gamma.abs().sum())
        return total


def rho_schedule(rho: float, epoch_free: float, epoch_warmup: float, steps_per_epoch: int) -> Callable[[int], float]:
    """ρ at a global step: 0 until ``epoch_free``, linear up to ``rho`` at ``epoch_warmup``, then ``rho``
    (the original's stepwise linear scheduler)."""
    free, warm = epoch_free * steps_per_epoch, epoch_warmup * steps_per_epoch

    def at(step: int) -> float:
        if step < free:
            return 0.0
        if step >= warm:
            return rho
        return (step - free) / (warm - free) * rho
    return at


@torch.no_grad()
def shrink_keep(net: hnet.HRNet, threshold: float, tokens: bool = True) -> hnet.Keep:
    """Indices of the channels / tokens whose BN scale |γ| is above ``threshold``."""
    keep: hnet.Keep = {}
    for name, block in net.named_blocks():
        entry = {}
        for k, bn in block.depthwise_bns().items():
            idx = torch.nonzero(bn.weight.abs() > threshold).flatten().cpu()
            if idx.numel():
                entry[f"k{k}"] = idx
        if block.transformer is not None:
            gamma = block.transformer.input_norm.weight
            idx = torch.nonzero(gamma.abs() > threshold).flatten().cpu() if tokens \
                else torch.arange(gamma.numel())
            if idx.numel():
                entry["tokens"] = idx
        keep[name] = entry
    return keep


def shrink(net: hnet.HRNet, threshold: float, tokens: bool = True) -> tuple[hnet.HRNet, hnet.Keep]:
    """The physically smaller network without the channels / tokens under ``threshold`` (and the kept indices)."""
    keep = shrink_keep(net, threshold, tokens)
    return hnet.extract(net, keep), keep


@torch.no_grad()
def remap_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module, keep: hnet.Keep) -> None:
    """Point ``optimizer`` at ``new``'s parameters (same groups, same hyperparameters) and slice its per-parameter
    state (moments, momentum buffers) as the parameters were sliced; removed parameters leave it."""
    old_names = {id(p): n for n, p in old.named_parameters()}
    new_params = dict(new.named_parameters())
    old_state = optimizer.state
    new_state: dict = {}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = old_names.get(id(p))
            if name is None:  # not the network's (e.g. another head): keep as it is
                params.append(p)
                if p in old_state:
                    new_state[p] = old_state[p]
                continue
            if name not in new_params:
                continue
            q = new_params[name]
            params.append(q)
            if p in old_state:
                rule = hnet.slice_rule(name, keep)
                st = {}
                for key, value in old_state[p].items():
                    if torch.is_tensor(value) and value.shape == p.shape and rule is not None:
                        value = value.index_select(rule[0], rule[1].to(value.device)).clone()
                    st[key] = value
                new_state[q] = st
        group["params"] = params
    optimizer.state.clear()
    optimizer.state.update(new_state)


@dataclass
class ShrinkRecord:
    epoch: int
    macs: int
    params: int
    arch: dict = field(repr=False)
    metrics: dict = field(default_factory=dict)
    shrunk: bool = False
    seconds: float = 0.0


class ProgressiveShrinking(pl.Callback):
    """Lightning callback doing HR-NAS progressive shrinking on ``pl_module.model`` (an :class:`HRNet`).

    ``rho``: penalty weight; ``epoch_free`` / ``epoch_warmup``: its linear warmup; ``threshold``: |γ| under which a
    channel / token is dead (the original's 1e-3); ``interval``: epochs between shrink checks (the original's
    ``eval_interval``); ``min_delta_macs``: shrink only when at least that many MACs go (always at the last
    epoch); ``tokens``: also remove tokens; ``verify``: check after each shrink that torch's FlopCounterMode on the
    new module equals the closed-form MACs of its arch and that they went down.
    ``history`` holds one :class:`ShrinkRecord` per epoch (MACs after that epoch's shrink, validation metrics).
    """

    def __init__(self, rho: float = 5e-3, epoch_free: float = 0, epoch_warmup: float = 2, threshold: float = 1e-3,
                 interval: int = 2, min_delta_macs: int = 0, tokens: bool = True, verify: bool = True,
                 on_epoch: Callable[[ShrinkRecord], None] | None = None):
        super().__init__()
        if rho < 0 or threshold < 0 or interval < 1 or epoch_warmup < epoch_free:
            raise RetiaError(f"shrinking: rho {rho} >= 0, threshold {threshold} >= 0, interval {interval} >= 1 and "
                             f"epoch_warmup {epoch_warmup} >= epoch_free {epoch_free} expected")
        self.rho, self.epoch_free, self.epoch_warmup = rho, epoch_free, epoch_warmup
        self.threshold, self.interval, self.min_delta_macs = threshold, interval, min_delta_macs
        self.tokens, self.verify, self.on_epoch = tokens, verify, on_epoch
        self.history: list[ShrinkRecord] = []
        self.penalty: ResourcePenalty | None = None
        self._rho_at: Callable[[int], float] | None = None
        self.last_penalty = 0.0
        self._t0 = 0.0

    def _net(self, pl_module) -> hnet.HRNet:
        net = getattr(pl_module, "model", None)
        if not isinstance(net, hnet.HRNet):
            raise RetiaError(f"progressive shrinking needs an HRNet as the Lightning module's model, got "
                             f"{type(net).__name__}")
        return net

    def on_fit_start(self, trainer, pl_module):
        net = self._net(pl_module)
        self.penalty = ResourcePenalty(net)
        steps = max(1, int(trainer.num_training_batches)) if trainer.num_training_batches != float("inf") else 1
        self._rho_at = rho_schedule(self.rho, self.epoch_free, self.epoch_warmup, steps)
        self._t0 = time.perf_counter()
        record = ShrinkRecord(-1, hnet.count_macs(net.config, net.arch), _params(net), dict(net.arch))
        self.history.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rho = self._rho_at(trainer.global_step)
        if rho > 0:
            self.last_penalty = self.penalty.add_grad(self._net(pl_module), rho, self.threshold)
            pl_module.log("bn_l1", self.last_penalty, prog_bar=False)

    def on_train_epoch_end(self, trainer, pl_module):
        net = self._net(pl_module)
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs - 1
        shrunk = False
        if (epoch + 1) % self.interval == 0 or last:
            shrunk = self.apply_shrink(trainer, pl_module, force=last)
        net = self._net(pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        record = ShrinkRecord(epoch, hnet.count_macs(net.config, net.arch), _params(net), dict(net.arch), metrics,
                              shrunk, time.perf_counter() - self._t0)
        self.history.append(record)
        pl_module.log("macs", float(record.macs), prog_bar=True)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def apply_shrink(self, trainer, pl_module, force: bool = False) -> bool:
        """Shrink ``pl_module.model`` now; returns whether anything was removed."""
        old = self._net(pl_module)
        keep = shrink_keep(old, self.threshold, self.tokens)
        arch = hnet.arch_of_keep(old, keep)
        before, after = hnet.count_macs(old.config, old.arch), hnet.count_macs(old.config, arch)
        if arch == old.arch or (before - after < self.min_delta_macs and not force):
            return False
        new = hnet.extract(old, keep)
        for optimizer in trainer.optimizers:
            remap_optimizer(optimizer, old, new, keep)
        if hasattr(pl_module, "set_model"):  # NNI's LightningModule keeps the model behind a property
            pl_module.set_model(new)
        else:
            pl_module.model = new
        if self.verify:
            from ..profile import count_flops

            measured = count_flops(new, (1, 3) + hnet.input_hw(new.config))
            if not (measured == after < before):
                raise RuntimeError(f"shrinking bookkeeping: FlopCounterMode {measured}, closed form {after}, "
                                   f"before {before}")
        _logger.info("shrunk: %d -> %d MACs", before, after)
        return True


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class ProgressiveShrinkingStrategy(Strategy):
    """HR-NAS progressive shrinking as an NNI strategy (see the module docstring).

    Needs a raw-format :class:`~retia.spaces.hrnas.HRNASSpace` with a Lightning evaluator (NNI's sequential
    engine). ``_run`` attaches a :class:`ProgressiveShrinking` callback (built from ``callback_kwargs``) to the
    evaluator's trainer, trains ``space.network`` and sets ``space.network`` to the shrunk result. After the run:
    :attr:`callback` (its ``history``), :attr:`arch` (the searched arch dict), :attr:`network`, and
    :meth:`list_models` / the experiment's ``export_top_models`` give the one searched model.
    """

    def __init__(self, **callback_kwargs: Any):
        super().__init__()
        self.callback = ProgressiveShrinking(**callback_kwargs)
        self.arch: dict[str, int] | None = None
        self.network: hnet.HRNet | None = None
        self.final_metric: float | None = None

    def _initialize(self, model_space, engine):
        from nni.nas.evaluator.pytorch import Lightning
        from nni.nas.space import RawFormatModelSpace

        from ..spaces.hrnas import HRNASSpace

        if not isinstance(model_space, RawFormatModelSpace) or not isinstance(model_space.model_space, HRNASSpace):
            raise RetiaError("progressive shrinking needs an HRNASSpace in NNI's raw model format "
                             "(sequential execution engine)")
        if not isinstance(model_space.evaluator, Lightning):
            raise RetiaError(f"progressive shrinking needs a Lightning evaluator, got "
                             f"{type(model_space.evaluator).__name__}")
        return model_space

    def _run(self) -> None:
        space = self.model_space.model_space
        evaluator = self.model_space.evaluator
        if self.callback not in evaluator.trainer.callbacks:
            evaluator.trainer.callbacks.append(self.callback)
        evaluator.evaluate(space.network)
        final = evaluator.module.model
        space.network = final
        self.network, self.arch = final, dict(final.arch)
        metrics = self.callback.history[-1].metrics if self.callback.history else {}
        self.final_metric = metrics.get("val_top1")

    def list_models(self, sort: bool = True, limit: int | None = None) -> Iterator:
        if self.arch is None:
            return
        model = self.model_space.freeze(self.arch)
        if self.final_metric is not None:
            model.metrics.final = self.final_metric
        yield model

    def state_dict(self) -> dict:
        return {"arch": self.arch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.arch = state_dict.get("arch")
