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

Two optional parts of the original's training loop (``train.py``, ``utils/optim.py``, ``utils/common.py``):

* **EMA of the weights** (:class:`ModelEMA`, :class:`WeightEMA`; ``ema_decay`` > 0): a copy of the network whose
  parameters and BN running statistics follow shadow ← d·shadow + (1 − d)·value after every optimizer step, with
  d = min(decay, (1 + n) / (10 + n)) at the n-th update (TensorFlow's warm start, as the original). Validation
  runs on the copy and it is the searched network at the end. At a shrink a unit survives when its scale is
  above the threshold in the live network *or* in the copy (the original ORs the two masks), except at the last
  epoch, where the copy alone decides (the original's ``ema_only``); the copy is then cut with the same kept
  indices (:func:`retia.spaces.hrnas.network.extract`), so the averages of the surviving channels carry over
  exactly.
* **BN recalibration** (:func:`recalibrate_bn`; ``bn_recalibration_batches`` > 0): after the last shrink the
  final network's BN running statistics are reset and re-estimated as the plain average over that many
  training batches (``momentum=None``; the original's ``bn_calibration``), since the shrunk network's
  activations no longer match statistics collected while it was bigger.

Under DDP (Lightning's ``strategy="ddp"``, several processes) every rank runs the callback: the keep decision is
rank 0's (broadcast before each shrink, so the ranks cannot disagree even if their scales drifted), the smaller
network gets SyncBatchNorm layers when the trainer syncs BN, Lightning's ``DistributedDataParallel`` wrapper is
rebuilt around the new parameters (the old one would go on reducing the gradients of the removed network), and
when training ends the final network's buffers (BN statistics — averaged over the ranks after a recalibration —
and constants) are made rank 0's. ``on_epoch`` is called on rank 0 only, so what it writes is written once.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pytorch_lightning as pl
import torch
from nni.nas.strategy.base import Strategy
from torch import nn

from ..errors import RetiaError
from ..spaces.hrnas import network as hnet

_logger = logging.getLogger(__name__)
EPS = 1e-5  # the original's guard in the normaliser's denominator

__all__ = ["ResourcePenalty", "rho_schedule", "shrink_keep", "union_keep", "shrink", "remap_optimizer", "ModelEMA",
           "WeightEMA", "recalibrate_bn", "broadcast_keep", "rewrap_ddp", "sync_buffers", "ProgressiveShrinking",
           "ProgressiveShrinkingStrategy"]
MONITORS = ("val_top1", "val_miou", "val_ap")  # the validation metrics the strategy reports, first one logged


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


def union_keep(a: hnet.Keep, b: hnet.Keep) -> hnet.Keep:
    """The units kept in ``a`` or in ``b`` (sorted indices per block and key)."""
    out: hnet.Keep = {}
    for name in a.keys() | b.keys():
        ea, eb = a.get(name, {}), b.get(name, {})
        out[name] = {}
        for key in ea.keys() | eb.keys():
            parts = [e[key] for e in (ea, eb) if key in e]
            out[name][key] = torch.unique(torch.cat(parts)) if len(parts) > 1 else parts[0]
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# EMA of the weights, BN recalibration
# ---------------------------------------------------------------------------------------------------------------
def _model(pl_module) -> nn.Module:
    return pl_module.model


def _set_model(pl_module, net: nn.Module) -> None:
    if hasattr(pl_module, "set_model"):  # NNI's LightningModule keeps the model behind a property
        pl_module.set_model(net)
    else:
        pl_module.model = net


# ---------------------------------------------------------------------------------------------------------------
# DDP: one keep decision, the wrapper rebuilt after a swap, the final buffers made equal
# ---------------------------------------------------------------------------------------------------------------
def _world_size(trainer) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def _is_global_zero(trainer) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def broadcast_keep(trainer, keep: hnet.Keep) -> hnet.Keep:
    """Rank 0's ``keep`` on every rank (through ``trainer.strategy.broadcast``; unchanged in one process), so all
    ranks cut the same units even where their scales differ (they do not while the gradients are all-reduced, but
    nothing else guarantees it)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or _world_size(trainer) <= 1:
        return keep
    plain = {block: {key: [int(i) for i in idx.tolist()] for key, idx in entry.items()}
             for block, entry in keep.items()}
    plain = strategy.broadcast(plain, src=0)
    return {block: {key: torch.tensor(idx, dtype=torch.long) for key, idx in entry.items()}
            for block, entry in plain.items()}


def _sync_layers(trainer, net: nn.Module) -> nn.Module:
    """``net`` with SyncBatchNorm layers when the trainer converted the model's BNs (``sync_batchnorm=True``); the
    parameters stay the same objects."""
    layer_sync = getattr(getattr(trainer, "strategy", None), "_layer_sync", None)
    return layer_sync.apply(net) if layer_sync is not None else net


def rewrap_ddp(trainer) -> bool:
    """After the Lightning module's network was replaced: wrap the module in a new ``DistributedDataParallel``
    (Lightning's own ``configure_ddp``: the same DDP arguments, communication hooks registered again), whose reducer
    knows the new parameters; its constructor also broadcasts rank 0's parameters and buffers. Returns whether
    there was a DDP wrapper to rebuild."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = getattr(trainer, "strategy", None)
    if strategy is None or not isinstance(getattr(strategy, "model", None), DistributedDataParallel):
        return False
    if not hasattr(strategy, "configure_ddp"):
        raise RuntimeError(f"progressive shrinking: {type(strategy).__name__} wraps the model in "
                           "DistributedDataParallel but cannot re-wrap it after a shrink (use strategy='ddp')")
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
    return True


@torch.no_grad()
def sync_buffers(trainer, net: nn.Module, average_bn: bool = False) -> bool:
    """Make ``net``'s buffers equal on every rank: BN running mean / variance averaged over the ranks first when
    ``average_bn`` (each rank estimated them on its own batches), then every buffer broadcast from rank 0.
    Parameters are left alone (DDP keeps them equal). Returns whether anything was communicated."""
    import torch.distributed as dist

    if _world_size(trainer) <= 1 or not (dist.is_available() and dist.is_initialized()):
        return False
    if average_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t.div_(dist.get_world_size())
    for t in net.buffers():
        dist.broadcast(t, src=0)
    return True


class ModelEMA:
    """Exponential moving average of ``net``'s parameters and BN running statistics, kept in a frozen copy
    :attr:`net` (the original's ``ExponentialMovingAverage`` over ``named_parameters`` + ``running_mean`` /
    ``running_var``).

    :meth:`update` (after each optimizer step): shadow ← d·shadow + (1 − d)·value with
    d = :meth:`rate` (n) = min(``decay``, (1 + n) / (10 + n)) at the n-th update (n = 1, 2, ...). The copy's other
    buffers (BN batch counters, the ``const`` of a block without branches) are its own. :meth:`shrink` cuts the
    copy with a shrink's kept indices.
    """

    def __init__(self, net: nn.Module, decay: float):
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise RetiaError(f"EMA decay {decay!r}: expected a number in (0, 1) (0 turns the EMA off)")
        self.decay, self.updates = float(decay), 0
        self.net = self._freeze(copy.deepcopy(net))

    @staticmethod
    def _freeze(net: nn.Module) -> nn.Module:
        net.eval()
        net.requires_grad_(False)
        return net

    @staticmethod
    def averaged(net: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the average covers: every parameter and BN running mean / variance, by name."""
        out = {n: p for n, p in net.named_parameters()}
        out.update({n: b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))})
        return out

    def rate(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> float:
        """One averaging step towards ``net`` (same arch as :attr:`net`); returns the decay used."""
        live = self.averaged(net)
        shadow = self.averaged(self.net)
        if live.keys() != shadow.keys():
            raise RuntimeError("EMA: the network and its average differ in structure (shrink both with one keep)")
        device = next(iter(live.values())).device
        if next(iter(shadow.values())).device != device:
            self.net.to(device)
            shadow = self.averaged(self.net)
        self.updates += 1
        d = self.rate(self.updates)
        for name, value in live.items():
            target = shadow[name]
            if target.shape != value.shape:
                raise RuntimeError(f"EMA: {name} is {tuple(value.shape)} in the network, {tuple(target.shape)} "
                                   "in its average")
            target.mul_(d).add_(value.detach(), alpha=1.0 - d)
        return d

    def shrink(self, keep: hnet.Keep) -> None:
        """Cut the average like the network: the kept channels / tokens keep their averaged values."""
        self.net = self._freeze(hnet.extract(self.net, keep))


class WeightEMA(pl.Callback):
    """Lightning callback keeping a :class:`ModelEMA` of ``pl_module.model``: updated after every optimizer step,
    swapped in for validation, and left as ``pl_module.model`` when training ends (the averaged weights are the
    result). ``decay`` in (0, 1)."""

    def __init__(self, decay: float):
        super().__init__()
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise RetiaError(f"EMA decay {decay!r}: expected a number in (0, 1) (0 turns the EMA off)")
        self.decay = float(decay)
        self.ema: ModelEMA | None = None
        self._live: nn.Module | None = None
        self._step = -1

    def on_fit_start(self, trainer, pl_module):
        self.ema = ModelEMA(_model(pl_module), self.decay)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.ema is not None and trainer.global_step != self._step:  # an optimizer step happened
            self._step = trainer.global_step
            self.ema.update(_model(pl_module))

    def on_validation_start(self, trainer, pl_module):
        if self.ema is not None and self._live is None and _model(pl_module) is not self.ema.net:
            self._live = _model(pl_module)
            _set_model(pl_module, self.ema.net.eval())

    def on_validation_end(self, trainer, pl_module):
        if self._live is not None:
            _set_model(pl_module, self._live)
            self._live = None

    def on_train_end(self, trainer, pl_module):
        if self.ema is not None:
            _set_model(pl_module, self.ema.net.requires_grad_(True))


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable, num_batches: int) -> int:
    """Reset every BatchNorm's running statistics of ``net`` and re-estimate them from the first ``num_batches``
    of ``batches`` (tensors, or tuples / lists whose first item is the input): BN layers in training mode with
    ``momentum=None`` (PyTorch's cumulative average: running mean = mean of the batch means, running variance =
    mean of the unbiased batch variances), everything else (dropout) in eval mode; no gradients. Momenta and the
    train / eval mode are restored. Returns the number of batches used."""
    if not isinstance(num_batches, int) or num_batches < 1:
        raise RetiaError(f"BN recalibration batches {num_batches!r}: expected an int >= 1")
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training, momenta = net.training, [bn.momentum for bn in bns]
    device = next(net.parameters()).device
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not torch.is_tensor(x):
                raise RetiaError(f"BN recalibration: a batch of {type(batch).__name__}; expected a tensor or "
                                 "(input, ...) tuple")
            net(x.to(device))
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        net.train(was_training)
    if used == 0:
        raise RetiaError("BN recalibration: the training data gave no batch")
    return used


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
    ``ema_decay`` > 0: keep an EMA of the weights (:class:`WeightEMA`; validated on, shrunk with the network, the
    result at the end — see the module docstring); ``bn_recalibration_batches`` > 0: re-estimate the final
    network's BN statistics on that many training batches when training ends (:func:`recalibrate_bn`).
    ``history`` holds one :class:`ShrinkRecord` per epoch (MACs after that epoch's shrink, validation metrics);
    ``on_epoch(record)`` is called with each (on the global rank 0 only); ``recalibrated``: the batches the BN
    recalibration used. Works under Lightning's DDP (see the module docstring).
    """

    def __init__(self, rho: float = 5e-3, epoch_free: float = 0, epoch_warmup: float = 2, threshold: float = 1e-3,
                 interval: int = 2, min_delta_macs: int = 0, tokens: bool = True, verify: bool = True,
                 on_epoch: Callable[[ShrinkRecord], None] | None = None, ema_decay: float = 0.0,
                 bn_recalibration_batches: int = 0):
        super().__init__()
        if rho < 0 or threshold < 0 or interval < 1 or epoch_warmup < epoch_free:
            raise RetiaError(f"shrinking: rho {rho} >= 0, threshold {threshold} >= 0, interval {interval} >= 1 and "
                             f"epoch_warmup {epoch_warmup} >= epoch_free {epoch_free} expected")
        if not (isinstance(bn_recalibration_batches, int) and bn_recalibration_batches >= 0):
            raise RetiaError(f"shrinking: bn_recalibration_batches {bn_recalibration_batches!r}: expected an int >= 0")
        self.rho, self.epoch_free, self.epoch_warmup = rho, epoch_free, epoch_warmup
        self.threshold, self.interval, self.min_delta_macs = threshold, interval, min_delta_macs
        self.tokens, self.verify, self.on_epoch = tokens, verify, on_epoch
        self.ema = WeightEMA(ema_decay) if ema_decay else None
        self.bn_recalibration_batches, self.recalibrated = bn_recalibration_batches, 0
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
        if self.ema is not None:
            self.ema.on_fit_start(trainer, pl_module)
        self.penalty = ResourcePenalty(net)
        steps = max(1, int(trainer.num_training_batches)) if trainer.num_training_batches != float("inf") else 1
        self._rho_at = rho_schedule(self.rho, self.epoch_free, self.epoch_warmup, steps)
        self._t0 = time.perf_counter()
        record = ShrinkRecord(-1, hnet.count_macs(net.config, net.arch), _params(net), dict(net.arch))
        self.history.append(record)
        if self.on_epoch is not None and _is_global_zero(trainer):
            self.on_epoch(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rho = self._rho_at(trainer.global_step)
        if rho > 0:
            self.last_penalty = self.penalty.add_grad(self._net(pl_module), rho, self.threshold)
            pl_module.log("bn_l1", self.last_penalty, prog_bar=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer, pl_module):
        if self.ema is not None:
            self.ema.on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.ema is not None:
            self.ema.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        """The final network: the EMA copy when on; then its BN statistics re-estimated when asked."""
        if self.ema is not None:
            self.ema.on_train_end(trainer, pl_module)
        if self.bn_recalibration_batches:
            loader = trainer.train_dataloader
            if loader is None and trainer.datamodule is not None:
                loader = trainer.datamodule.train_dataloader()
            if loader is None:
                raise RetiaError("BN recalibration: the trainer has no training data")
            self.recalibrated = recalibrate_bn(self._net(pl_module), loader, self.bn_recalibration_batches)
        # DDP: the ranks' BN statistics (and an EMA's) came from their own batches; the result is one network
        sync_buffers(trainer, self._net(pl_module), average_bn=bool(self.recalibrated))

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
        if self.on_epoch is not None and _is_global_zero(trainer):
            self.on_epoch(record)

    def keep(self, net: hnet.HRNet, final: bool = False) -> hnet.Keep:
        """The units to keep: |γ| above the threshold in ``net``, or in its EMA when on (at the ``final`` shrink
        the EMA alone decides: it is the network that remains)."""
        keep = shrink_keep(net, self.threshold, self.tokens)
        if self.ema is None or self.ema.ema is None:
            return keep
        averaged = shrink_keep(self.ema.ema.net, self.threshold, self.tokens)
        return averaged if final else union_keep(keep, averaged)

    def apply_shrink(self, trainer, pl_module, force: bool = False) -> bool:
        """Shrink ``pl_module.model`` (and its EMA) now; returns whether anything was removed. ``force``: the last
        shrink (done whatever ``min_delta_macs`` says; with the EMA on, the average alone picks the units)."""
        old = self._net(pl_module)
        keep = broadcast_keep(trainer, self.keep(old, final=force))  # under DDP: rank 0's decision on every rank
        arch = hnet.arch_of_keep(old, keep)
        before, after = hnet.count_macs(old.config, old.arch), hnet.count_macs(old.config, arch)
        if arch == old.arch or (before - after < self.min_delta_macs and not force):
            return False
        new = hnet.extract(old, keep)
        for optimizer in trainer.optimizers:
            remap_optimizer(optimizer, old, new, keep)
        if self.ema is not None and self.ema.ema is not None:
            self.ema.ema.shrink(keep)
        if self.verify:
            from ..profile import count_flops

            measured = count_flops(new, (1, 3) + hnet.input_hw(new.config))
            if not (measured == after < before):
                raise RuntimeError(f"shrinking bookkeeping: FlopCounterMode {measured}, closed form {after}, "
                                   f"before {before}")
        _set_model(pl_module, _sync_layers(trainer, new))
        rewrap_ddp(trainer)  # under DDP: a reducer that knows the new parameters
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
    :meth:`list_models` / the experiment's ``export_top_models`` give the one searched model, whose metric is the
    last epoch's ``monitor`` (default: the first of ``val_top1``, ``val_miou``, ``val_ap`` the module logged).
    """

    def __init__(self, monitor: str | None = None, **callback_kwargs: Any):
        super().__init__()
        self.callback = ProgressiveShrinking(**callback_kwargs)
        self.monitor = monitor
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
        monitor = self.monitor or next((m for m in MONITORS if m in metrics), None)
        self.final_metric = metrics.get(monitor) if monitor else None

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
