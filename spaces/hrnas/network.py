"""HR-NAS networks (Ding et al., CVPR 2021): config, layout, plain modules, arch dicts, closed-form MACs.

A *config* (JSON-able dict, see :data:`PRESETS`) fixes the supernet: stem widths, the stages
(``[branches, [blocks per branch], [channels per branch]]``, the original's ``inverted_residual_setting``),
head, width multiplier, input size and task. :func:`layout` turns it into the ordered list of searchable blocks
(:class:`BlockSpec`) — the order of the original's ``get_named_block_list`` and thus of its ``best_model.json``.

An *arch* is a flat dict, also the NNI sample of :class:`retia.spaces.hrnas.HRNASSpace`:
``"<block>.k<kernel>"`` → hidden channels kept in that depthwise-kernel branch (0 removes the branch) and
``"<block>.tokens"`` → tokens of the block's transformer (0 removes it). :class:`HRNet` builds the plain network
of a (config, arch); :func:`count_macs` is its multiply-add count in closed form (equal to torch's
``FlopCounterMode``, tested); :func:`slice_state` copies weights from a bigger network (first-n channels, or the
given indices when shrinking).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from ...errors import RetiaError

TASKS = ("classification", "segmentation", "keypoint")
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "swish": nn.SiLU, "hswish": nn.Hardswish}

_BASE_STAGES = [[1, [1], [24]], [2, [2, 2], [18, 36]], [3, [2, 2, 3], [18, 36, 72]],
                [4, [2, 2, 3, 4], [18, 36, 72, 144]], [4, [2, 2, 3, 4], [18, 36, 72, 144]]]
DEFAULTS: dict[str, Any] = dict(
    task="classification", num_classes=1000, input_size=224, input_channel=[24, 24], stages=_BASE_STAGES,
    head_channels=[36, 72, 144, 320], last_channel=1600, expand_ratio=4, kernel_sizes=[3, 5, 7], width_mult=1.0,
    round_nearest=2, transformer=True, max_tokens=64, token_size=8, transformer_dropout=0.1, dropout=0.2,
    active_fn="relu", bn_momentum=0.01, bn_eps=1e-3)
# The original's configs (configs/cls_imagenet.yml, seg_cityscapes.yml, seg_ade20k.yml, keypoint_coco.yml) with the
# transformers actually built, and small ones for CPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "cls_imagenet": dict(),
    "seg_cityscapes": dict(task="segmentation", num_classes=19, input_size=[512, 1024], head_channels=None,
                           last_channel=90),
    "seg_ade20k": dict(task="segmentation", num_classes=150, input_size=512, head_channels=None, last_channel=90),
    "keypoint_coco": dict(task="keypoint", num_classes=17, input_size=[256, 192], head_channels=None,
                          last_channel=90, bn_momentum=0.1, bn_eps=1e-5),
    # the benchmark setting: the ImageNet layout at width x0.25 on 64x64 inputs
    "cpu": dict(num_classes=10, input_size=64, width_mult=0.25, max_tokens=16, bn_momentum=0.1),
    # three stages, one block per branch: the default CPU search on the embedded digits, and the tests
    "tiny": dict(num_classes=10, input_size=32, width_mult=0.5, input_channel=[16, 16],
                 stages=[[1, [1], [16]], [2, [1, 1], [16, 32]], [3, [1, 1, 1], [16, 32, 64]]],
                 head_channels=[16, 32, 64], last_channel=256, max_tokens=8, token_size=4, bn_momentum=0.1),
}


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` (at least ``min_value``), never more than 10% below it
    (MobileNet's rule, as the original)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


# ---------------------------------------------------------------------------------------------------------------
# config and layout
# ---------------------------------------------------------------------------------------------------------------
def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The full config of preset ``name`` with ``overrides``; validated (one-line :class:`RetiaError`)."""
    if name not in PRESETS:
        raise RetiaError(f"HR-NAS preset {name!r}: expected one of {', '.join(PRESETS)}")
    return make_config(**dict(PRESETS[name], **overrides))


def make_config(**kwargs: Any) -> dict[str, Any]:
    """A validated config: :data:`DEFAULTS` updated by ``kwargs`` (unknown keys are an error)."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise RetiaError(f"HR-NAS config: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(kwargs))
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict[str, Any]) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise RetiaError(f"HR-NAS config: {msg}")

    need(cfg["task"] in TASKS, f"task {cfg['task']!r}: expected one of {', '.join(TASKS)}")
    need(isinstance(cfg["width_mult"], (int, float)) and cfg["width_mult"] > 0,
         f"width_mult {cfg['width_mult']!r}: expected a number > 0")
    need(cfg["active_fn"] in ACTIVATIONS, f"active_fn {cfg['active_fn']!r}: expected one of {', '.join(ACTIVATIONS)}")
    size = cfg["input_size"]
    need((isinstance(size, int) and size >= 8) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                     and all(isinstance(s, int) and s >= 8 for s in size)),
         f"input_size {size!r}: expected an int >= 8 or [height, width]")
    need(isinstance(cfg["num_classes"], int) and cfg["num_classes"] >= 1,
         f"num_classes {cfg['num_classes']!r}: expected an int >= 1")
    ks = cfg["kernel_sizes"]
    need(isinstance(ks, list) and ks and len(set(ks)) == len(ks) and all(isinstance(k, int) and k % 2 == 1 for k in ks),
         f"kernel_sizes {ks!r}: expected distinct odd ints")
    need(isinstance(cfg["input_channel"], list) and len(cfg["input_channel"]) == 2,
         f"input_channel {cfg['input_channel']!r}: expected [stem conv 1, stem conv 2] channels")
    stages = cfg["stages"]
    need(isinstance(stages, list) and len(stages) >= 1, f"stages {stages!r}: expected a non-empty list")
    prev = 1
    for i, st in enumerate(stages):
        ok = (isinstance(st, (list, tuple)) and len(st) == 3 and isinstance(st[0], int) and st[0] >= 1
              and len(st[1]) == st[0] and len(st[2]) == st[0])
        need(ok, f"stage {i} {st!r}: expected [branches, [blocks per branch], [channels per branch]]")
        need(st[0] >= prev, f"stage {i} has {st[0]} branches, fewer than the {prev} before it")
        prev = st[0]
    if cfg["head_channels"] is not None and cfg["task"] == "classification":
        need(len(cfg["head_channels"]) == stages[-1][0],
             f"head_channels {cfg['head_channels']!r}: expected one per branch of the last stage ({stages[-1][0]})")
    need(isinstance(cfg["max_tokens"], int) and cfg["max_tokens"] >= 0,
         f"max_tokens {cfg['max_tokens']!r}: expected an int >= 0")


def input_hw(cfg: Mapping[str, Any]) -> tuple[int, int]:
    s = cfg["input_size"]
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def _half(hw: tuple[int, int]) -> tuple[int, int]:
    """Output size of a stride-2 conv with 'same' padding (odd kernel)."""
    return ((hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1)


@dataclass(frozen=True)
class BlockSpec:
    """One searchable block: name, in/out channels, stride, input size, max hidden channels per kernel branch and
    whether it carries a transformer (blocks with an identity shortcut do, as the original's
    ``use_transformer``)."""
    name: str
    inp: int
    oup: int
    stride: int
    in_hw: tuple[int, int]
    hidden: int
    transformer: bool

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.in_hw if self.stride == 1 else _half(self.in_hw)


@dataclass(frozen=True)
class Layout:
    """The resolved (width-scaled) channels and the ordered blocks of a config."""
    stem: tuple[int, int]
    stages: list[tuple[int, list[int], list[int]]]
    head_channels: list[int] | None
    last_channel: int
    branch_hw: list[tuple[int, int]]
    blocks: list[BlockSpec]

    def block(self, name: str) -> BlockSpec:
        return self._by_name[name]

    @property
    def _by_name(self) -> dict[str, BlockSpec]:
        return {b.name: b for b in self.blocks}


def layout(cfg: Mapping[str, Any]) -> Layout:
    """Blocks of ``cfg`` in the original's order: per stage the fuse blocks (output by output, neighbours only,
    then the new branches), then the parallel blocks branch by branch; then the head's blocks."""
    w, r = cfg["width_mult"], cfg["round_nearest"]
    scale = lambda c: make_divisible(c * w, r)  # noqa: E731
    stem = (scale(cfg["input_channel"][0]), scale(cfg["input_channel"][1]))
    stages = [(int(n), [int(b) for b in blocks], [scale(c) for c in chans]) for n, blocks, chans in cfg["stages"]]
    head = None if cfg["head_channels"] is None or cfg["task"] != "classification" else \
        [scale(c) for c in cfg["head_channels"]]
    last = scale(cfg["last_channel"])
    hw0 = _half(_half(input_hw(cfg)))
    n_max = stages[-1][0]
    branch_hw = [hw0]
    for _ in range(1, n_max):
        branch_hw.append(_half(branch_hw[-1]))
    e, allow_t = cfg["expand_ratio"], bool(cfg["transformer"]) and cfg["max_tokens"] > 0

    def spec(name, inp, oup, stride, hw):
        return BlockSpec(name, inp, oup, stride, hw, int(round(inp * e)), allow_t and stride == 1 and inp == oup)

    blocks: list[BlockSpec] = []
    in_ch = [stem[1]]
    for s, (n_out, n_blocks, out_ch) in enumerate(stages):
        n_in = len(in_ch)
        new_branches = n_out > n_in
        for i in range(n_in if new_branches else n_out):
            for j in range(max(0, i - 1), min(n_in, i + 2)):
                stride = 2 if j < i else 1
                blocks.append(spec(f"s{s}_fuse{i}_{j}", in_ch[j], out_ch[i], stride, branch_hw[j]))
        for b in range(n_in, n_out) if new_branches else ():
            blocks.append(spec(f"s{s}_new{b}", out_ch[b - 1], out_ch[b], 2, branch_hw[b - 1]))
        for b in range(n_out):
            for k in range(n_blocks[b]):
                blocks.append(spec(f"s{s}_b{b}_{k}", out_ch[b], out_ch[b], 1, branch_hw[b]))
        in_ch = out_ch
    if cfg["task"] == "classification":
        chans = head if head is not None else in_ch
        if head is not None:
            for i, c in enumerate(in_ch):
                blocks.append(spec(f"head_incre{i}", c, head[i], 1, branch_hw[i]))
        for i in range(len(chans) - 1):
            blocks.append(spec(f"head_down{i}", chans[i], chans[i + 1], 2, branch_hw[i]))
    else:
        blocks.append(spec("head_transform", sum(in_ch), last, 1, branch_hw[0]))
    return Layout(stem, stages, head, last, branch_hw, blocks)


# ---------------------------------------------------------------------------------------------------------------
# arch dicts
# ---------------------------------------------------------------------------------------------------------------
def arch_choices(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Every arch key with its largest value (the supernet): ``<block>.k<k>`` → hidden, ``<block>.tokens`` →
    max_tokens."""
    out: dict[str, int] = {}
    for b in layout(cfg).blocks:
        for k in cfg["kernel_sizes"]:
            out[f"{b.name}.k{k}"] = b.hidden
        if b.transformer:
            out[f"{b.name}.tokens"] = int(cfg["max_tokens"])
    return out


def full_arch(cfg: Mapping[str, Any]) -> dict[str, int]:
    """The supernet's arch (every value at its maximum)."""
    return arch_choices(cfg)


def check_arch(cfg: Mapping[str, Any], arch: Mapping[str, Any]) -> dict[str, int]:
    """``arch`` as a plain ``{key: int}`` dict; a one-line error names a missing, unknown or out-of-range key."""
    if not isinstance(arch, Mapping):
        raise RetiaError(f"HR-NAS arch: expected a dict of '<block>.k<kernel>' / '<block>.tokens' ints, "
                         f"got {type(arch).__name__}")
    choices = arch_choices(cfg)
    unknown = sorted(set(arch) - set(choices))
    if unknown:
        raise RetiaError(f"HR-NAS arch: unknown key {unknown[0]!r} (expected keys like {next(iter(choices))!r})")
    missing = [k for k in choices if k not in arch]
    if missing:
        raise RetiaError(f"HR-NAS arch: missing key {missing[0]!r} ({len(missing)} missing)")
    out = {}
    for key, maximum in choices.items():
        v = arch[key]
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise RetiaError(f"HR-NAS arch: {key}={v!r}: expected an int in [0, {maximum}]")
        v = int(v)
        if not 0 <= v <= maximum:
            raise RetiaError(f"HR-NAS arch: {key}={v}: expected an int in [0, {maximum}]")
        out[key] = v
    return out


def block_channels(cfg: Mapping[str, Any], arch: Mapping[str, int], name: str) -> list[int]:
    return [int(arch[f"{name}.k{k}"]) for k in cfg["kernel_sizes"]]


def block_tokens(arch: Mapping[str, int], name: str) -> int:
    return int(arch.get(f"{name}.tokens", 0))


# ---------------------------------------------------------------------------------------------------------------
# closed-form MACs
# ---------------------------------------------------------------------------------------------------------------
def branch_macs_per_channel(spec: BlockSpec, kernel: int) -> int:
    """Multiply-adds of one hidden channel of a kernel branch: 1x1 expand at the input size, k x k depthwise and
    1x1 projection at the output size."""
    hi, wi = spec.in_hw
    ho, wo = spec.out_hw
    return spec.inp * hi * wi + kernel * kernel * ho * wo + spec.oup * ho * wo


def transformer_macs_terms(channels: int, token_size: int) -> tuple[int, int]:
    """``(a, b)`` with the transformer's MACs = a·n + b·n² for n tokens of dimension d = token_size²: projection
    of C+2 channels (the 2 coordinate maps) to n tokens, encoder (q, k, v, out, 2-layer FFN: 6·n·d² + 2·n²·d),
    decoder with n learned queries (the same), back-projection to C channels."""
    d = token_size * token_size
    a = (channels + 2) * d + 6 * d * d + 6 * d * d + channels * d
    b = 2 * d + 2 * d
    return a, b


def transformer_macs(channels: int, tokens: int, token_size: int) -> int:
    if tokens <= 0:
        return 0
    a, b = transformer_macs_terms(channels, token_size)
    return a * tokens + b * tokens * tokens


def block_macs(cfg: Mapping[str, Any], spec: BlockSpec, channels: list[int], tokens: int) -> int:
    ho, wo = spec.out_hw
    macs = sum(c * branch_macs_per_channel(spec, k) for k, c in zip(cfg["kernel_sizes"], channels))
    if not (spec.stride == 1 and spec.inp == spec.oup):
        macs += spec.inp * spec.oup // math.gcd(spec.inp, spec.oup) * ho * wo
    if spec.transformer:
        macs += transformer_macs(spec.inp, tokens, cfg["token_size"])
    return macs


def count_macs(cfg: Mapping[str, Any], arch: Mapping[str, Any] | None = None, batch: int = 1) -> int:
    """Multiply-adds of one forward pass of the network of (``cfg``, ``arch``) at the config's input size —
    convolutions, linears and attention products, as torch's ``FlopCounterMode`` counts them (tested equal)."""
    arch = full_arch(cfg) if arch is None else check_arch(cfg, arch)
    lay = layout(cfg)
    h, w = input_hw(cfg)
    h1, w1 = _half((h, w))
    h2, w2 = _half((h1, w1))
    macs = 3 * lay.stem[0] * 9 * h1 * w1 + lay.stem[0] * lay.stem[1] * 9 * h2 * w2
    for spec in lay.blocks:
        macs += block_macs(cfg, spec, block_channels(cfg, arch, spec.name), block_tokens(arch, spec.name))
    last_hw = lay.branch_hw[lay.stages[-1][0] - 1]
    if cfg["task"] == "classification":
        chans = lay.head_channels if lay.head_channels is not None else lay.stages[-1][2]
        macs += chans[-1] * lay.last_channel * last_hw[0] * last_hw[1] + lay.last_channel * cfg["num_classes"]
    else:
        hw0 = lay.branch_hw[0]
        macs += lay.last_channel * cfg["num_classes"] * hw0[0] * hw0[1]
    return macs * batch


# ---------------------------------------------------------------------------------------------------------------
# fast forward helpers (same math as the reference forward; see docs/hrnas.md, "Speed")
# ---------------------------------------------------------------------------------------------------------------
_REFERENCE = False


@contextlib.contextmanager
def reference_forward():
    """Within this context every :class:`HRNet` runs its straightforward forward: module by module in the input's
    memory format, attention as separate q / k / v products, ``nn.Dropout``, torch's depthwise backward. It is
    the definition the default (fast) forward is tested against: same parameters, same outputs and gradients up
    to float rounding, same closed-form and FlopCounterMode MACs."""
    global _REFERENCE
    old, _REFERENCE = _REFERENCE, True
    try:
        yield
    finally:
        _REFERENCE = old


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _same_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (channels-last stays channels-last through the transformer)."""
    return t.contiguous(memory_format=torch.channels_last) if _is_channels_last(like) else t


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook could see ``module``'s submodules (then the fast paths that skip or merge their
    calls step aside, so hooks see every module called as in :func:`reference_forward`)."""
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _keep_masks(ps: tuple[float, ...], training: bool, like: torch.Tensor,
                shapes: list[tuple[int, ...]]) -> list[torch.Tensor | None]:
    """Inverted-dropout masks (0 with probability p, else 1 / (1 - p)) for dropouts of rates ``ps`` on tensors of
    ``shapes`` (None: no dropout). Equal rates share one ``uniform_`` draw (cheaper than one ``bernoulli_`` per
    ``F.dropout``; the random stream differs from ``nn.Dropout``'s, the distribution does not)."""
    if not training or all(p == 0.0 for p in ps):
        return [None] * len(shapes)

    def draw(p, numel):
        if p >= 1.0:
            return torch.zeros(numel, dtype=like.dtype, device=like.device)
        return torch.empty(numel, dtype=like.dtype, device=like.device).uniform_().ge_(p).mul_(1.0 / (1.0 - p))

    sizes = [math.prod(shape) for shape in shapes]
    if len(set(ps)) == 1:
        flat = draw(ps[0], sum(sizes)).split(sizes)
    else:
        flat = [draw(p, n) if p > 0.0 else None for p, n in zip(ps, sizes)]
    return [None if m is None else m.view(shape) for m, shape in zip(flat, shapes)]


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _dw_weight_grad_by_batch_conv(x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int,
                                  padding: int) -> torch.Tensor:
    """Weight gradient of a depthwise conv: dW[c, i, j] = sum_{b,h,w} x_pad[b, c, s*h + i, s*w + j] g[b, c, h, w],
    computed as one grouped conv with the batch as input channels (group c: x[:, c] correlated with g[:, c],
    dilation = stride)."""
    b, c, h, w = x.shape
    out = F.conv2d(x.transpose(0, 1).reshape(1, c * b, h, w), grad.transpose(0, 1), None, 1, padding, stride, c)
    return out[0, :, :kernel, :kernel].unsqueeze(1)


_TAPS: dict[tuple, torch.Tensor] = {}


def _tap_matrix(kernel: int, stride: int, padding: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``T`` of shape (k*k, ho*wo*h*w): T[tap, (o, i)] = 1 where kernel tap ``tap`` links input pixel i to output
    pixel o, so a depthwise conv on an h x w map is, per channel, the (ho*wo, h*w) matrix W[c] @ T."""
    key = (kernel, stride, padding, h, w, like.dtype, like.device)
    if key not in _TAPS:
        ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        t = torch.zeros(kernel, kernel, ho, wo, h, w, dtype=like.dtype)
        for i in range(kernel):
            for j in range(kernel):
                for a in range(ho):
                    for b in range(wo):
                        y, x = a * stride + i - padding, b * stride + j - padding
                        if 0 <= y < h and 0 <= x < w:
                            t[i, j, a, b, y, x] = 1
        _TAPS[key] = t.view(kernel * kernel, ho * wo * h * w).to(like.device)
    return _TAPS[key]


class _DepthwiseConvFn(torch.autograd.Function):
    """Depthwise conv (no bias, square odd kernel, stride s, padding p): the forward is torch's conv (so counters
    see the same op), the backward is the same math computed differently (see :func:`_depthwise`):
    ``"matrix"`` — per channel the conv is a small dense matrix W[c] @ T (:func:`_tap_matrix`), so both gradients are
    batched matrix products; ``"batch-conv"`` — input gradient from torch, weight gradient from
    :func:`_dw_weight_grad_by_batch_conv`."""

    @staticmethod
    def forward(ctx, x, weight, stride: int, padding: int, mode: str):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.mode = stride, padding, mode
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s, p, c, k = ctx.stride, ctx.padding, weight.shape[0], weight.shape[-1]
        gx = gw = None
        if ctx.mode == "matrix":
            b, _, h, w = x.shape
            taps = _tap_matrix(k, s, p, h, w, x)
            gc = grad.transpose(0, 1).reshape(c, b, -1)  # (c, b, ho*wo)
            if ctx.needs_input_grad[0]:
                mat = torch.mm(weight.reshape(c, k * k), taps).view(c, gc.shape[-1], h * w)
                gx = torch.bmm(gc, mat).view(c, b, h, w).transpose(0, 1)
                gx = gx.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else gx.contiguous()
            if ctx.needs_input_grad[1]:
                outer = torch.bmm(gc.transpose(1, 2), x.transpose(0, 1).reshape(c, b, h * w))  # (c, ho*wo, h*w)
                gw = torch.mm(outer.view(c, -1), taps.t()).view(c, 1, k, k)
            return gx, gw, None, None, None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], c,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = _dw_weight_grad_by_batch_conv(x, grad, k, s, p)
        return gx, gw, None, None, None


def _batch_norm_cat(bns: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    """The BNs ``bns`` applied to their consecutive channel slices of ``x`` in one call; their running statistics
    and batch counters are updated as each BN's own forward would (same momentum, eps and mode required)."""
    b0 = bns[0]
    rm = torch.cat([bn.running_mean for bn in bns])
    rv = torch.cat([bn.running_var for bn in bns])
    out = F.batch_norm(x, rm, rv, torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns]),
                       b0.training, b0.momentum, b0.eps)
    if b0.training:
        with torch.no_grad():
            sizes = [bn.num_features for bn in bns]
            torch._foreach_copy_([bn.running_mean for bn in bns], list(rm.split(sizes)))
            torch._foreach_copy_([bn.running_var for bn in bns], list(rv.split(sizes)))
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return out


def _depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise conv. On CPU with gradients, oneDNN's depthwise backward has a large cost per
    call on small maps (measured per shape of the ``cpu`` preset, docs/hrnas.md "Speed"), so maps of <= 2x2 take
    the ``"matrix"`` backward and 4x4 maps with kernels >= 5 the ``"batch-conv"`` weight gradient; elsewhere
    torch's own backward is the fastest."""
    hw = x.shape[-2] * x.shape[-1]
    if (x.device.type != "cpu" or not torch.is_grad_enabled() or not conv.weight.requires_grad or hw > 16
            or _hooked(conv) or not _plain_depthwise(conv)):
        return conv(x)
    return _depthwise_cpu(x, conv.weight, conv.stride[0], conv.padding[0])


def _plain_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise conv with a square kernel, equal strides and paddings, no dilation, no bias."""
    return (conv.kernel_size[1] == conv.kernel_size[0] and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1] and conv.dilation == (1, 1) and conv.bias is None
            and conv.groups == conv.in_channels == conv.out_channels)


def _depthwise_cpu(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """A depthwise conv on the CPU with gradients, its backward chosen by map size as :func:`_depthwise` says."""
    hw = x.shape[-2] * x.shape[-1]
    if hw <= 4:
        return _DepthwiseConvFn.apply(x, weight, stride, padding, "matrix")
    if hw <= 16 and weight.shape[-1] >= 5:
        return _DepthwiseConvFn.apply(x, weight, stride, padding, "batch-conv")
    return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])


# the largest hidden tensor (elements) whose kernel branches run as one zero-padded depthwise conv in training on
# the CPU: below it the per-op cost dominates (forward + backward of the {3,5,7} branches of 24 channels on an 8x8
# map, batch 8: 1.13 ms as three convs, 0.75 ms as one), above it the padding's extra multiply-adds do (on 32x32:
# 4.4 ms against 5.7 ms); measured per shape, docs/hrnas.md "Speed"
MERGED_DEPTHWISE_MAX_NUMEL = 160_000


def _depthwise_merged(convs: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """The depthwise convs ``convs`` on their consecutive channel slices of ``x`` as one depthwise conv whose
    kernels are zero-padded to the largest one: the same outputs, and the same gradients for each conv's weight
    (the padding taps are constants built each call, not parameters)."""
    kmax = max(conv.kernel_size[0] for conv in convs)
    weight = torch.cat([F.pad(conv.weight, [(kmax - conv.kernel_size[0]) // 2] * 4) for conv in convs])
    return _depthwise_cpu(x, weight, convs[0].stride[0], kmax // 2)


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------
class ConvBNAct(nn.Sequential):
    """Conv (no bias) → BatchNorm → activation (none when ``act`` is None)."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1, act=None,
                 bn: dict | None = None):
        super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup, **(bn or {})), act() if act is not None else nn.Identity())


class _Attention(nn.Module):
    """Single-head dot-product attention with bias-free projections (as ``nn.MultiheadAttention(d, 1,
    bias=False)``), written with plain matmuls so every product is visible to the MACs counter."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.scale = dim ** -0.5

    def forward(self, query, key, value):
        scores = torch.matmul(self.q(query) * self.scale, self.k(key).transpose(1, 2))
        return self.out(torch.matmul(self.drop(scores.softmax(dim=-1)), self.v(value)))


class _EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer over tokens (feed-forward width = token dimension, as the original)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.attn = _Attention(dim, dropout)
        self.linear1 = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop, self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x):
        if _REFERENCE or _hooked(self):
            return self.forward_reference(x)
        a = self.attn
        # q, k, v as one product (the scale folded into q's weight), then the same attention
        q, k, v = F.linear(x, torch.cat([a.q.weight * a.scale, a.k.weight, a.v.weight])).chunk(3, dim=-1)
        return self._attend_feed_forward(q, k, v, x)

    def _attend_feed_forward(self, q, k, v, x):
        """The fast path after the projections: attention of ``q`` (``(b, n, d)``, or ``(n, d)`` shared by the batch)
        over ``k``, ``v``, residual on ``x``, norm, feed-forward, residual, norm; the four dropouts' masks drawn
        at once."""
        a = self.attn
        masks = _keep_masks((a.drop.p, self.drop1.p, self.drop.p, self.drop2.p), self.training, x,
                            [(x.shape[0], q.shape[-2], k.shape[-2]), tuple(x.shape),
                             tuple(x.shape[:-1]) + (self.linear1.out_features,), tuple(x.shape)])
        attn = torch.matmul(_masked(torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1), masks[0]), v)
        x = self.norm1(x + _masked(a.out(attn), masks[1]))
        h = _masked(F.relu(self.linear1(x)), masks[2])
        return self.norm2(x + _masked(self.linear2(h), masks[3]))

    def forward_reference(self, x):
        x = self.norm1(x + self.drop1(self.attn(x, x, x)))
        return self.norm2(x + self.drop2(self.linear2(self.drop(F.relu(self.linear1(x))))))


class _DecoderLayer(_EncoderLayer):
    """The original's decoder layer: learned queries attend to the encoded tokens, and the result is added to
    those tokens (query i refines token i), then the feed-forward part."""

    def forward(self, query, memory):  # type: ignore[override]
        if _REFERENCE or _hooked(self):
            return self.forward_reference(query, memory)
        a = self.attn
        # the learned queries are the same for every sample: project them once, (n, d), broadcast in the product
        q = F.linear(query, a.q.weight * a.scale)
        k, v = F.linear(memory, torch.cat([a.k.weight, a.v.weight])).chunk(2, dim=-1)
        return self._attend_feed_forward(q, k, v, memory)

    def forward_reference(self, query, memory):  # type: ignore[override]
        query = query.unsqueeze(0).repeat(memory.shape[0], 1, 1)  # the (n, d) queries, for every sample
        x = self.norm1(memory + self.drop1(self.attn(query, memory, memory)))
        return self.norm2(x + self.drop2(self.linear2(self.drop(F.relu(self.linear1(x))))))


def _coordinate_maps(size: int) -> torch.Tensor:
    """Two standardised coordinate maps (x, y) of a size x size grid: the original's 'points' position code."""
    r = torch.arange(size, dtype=torch.float32)
    r = (r - r.mean()) / r.std(unbiased=False) if size > 1 else r * 0
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx, yy])


class Transformer(nn.Module):
    """The lightweight transformer: the feature map (resized to token_size², plus two coordinate maps) is
    projected by a 1x1 conv + BN to ``tokens`` tokens of dimension token_size²; an encoder layer and a decoder
    layer with learned queries process them; a 1x1 conv + BN projects back to the channels, the result is resized
    to the input size and added to the input. The BN after the projection (``input_norm``) holds the tokens'
    scales that the token penalty acts on.

    Fast path (outside :func:`reference_forward`): the encoder's q, k, v projections as one product, the decoder's
    learned queries projected once for the whole batch, the four dropout masks of a layer drawn at once, the
    result kept in the input's memory format."""

    def __init__(self, tokens: int, channels: int, token_size: int = 8, dropout: float = 0.1, bn: dict | None = None):
        super().__init__()
        d = token_size * token_size
        self.tokens, self.token_size = tokens, token_size
        self.input_proj = nn.Conv2d(channels + 2, tokens, 1, bias=False)
        self.input_norm = nn.BatchNorm2d(tokens, **(bn or {}))
        self.encoder = _EncoderLayer(d, dropout)
        self.query_embed = nn.Parameter(torch.empty(tokens, d))
        self.decoder = _DecoderLayer(d, dropout)
        self.reverse_proj = nn.Conv2d(tokens, channels, 1, bias=False)
        self.reverse_norm = nn.BatchNorm2d(channels, **(bn or {}))
        self.register_buffer("coords", _coordinate_maps(token_size), persistent=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x):
        b, _, h, w = x.shape
        s = self.token_size
        f = x if (h, w) == (s, s) else F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        f = torch.cat([f, self.coords.unsqueeze(0).expand(b, -1, -1, -1)], dim=1)
        t = self.input_norm(self.input_proj(f)).flatten(2)  # b, n, d
        t = self.decoder(self.query_embed, self.encoder(t)).reshape(b, self.tokens, s, s)
        f = self.reverse_norm(self.reverse_proj(t if _REFERENCE else _same_format(t, x)))
        if (h, w) != (s, s):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        return f + x


class Block(nn.Module):
    """The searchable block (the original's ``InvertedResidualChannels``): one branch per depthwise kernel —
    1x1 expand + BN + act, k x k depthwise (stride) + BN + act, 1x1 projection — summed and batch-normed, plus the
    shortcut (identity, or a grouped 1x1 conv when the shape changes) and, on identity blocks, the transformer.
    The BN after each depthwise conv (``ops.k<k>.1.1``) holds the channel scales the search penalises.

    ``forward`` runs the branches merged (:meth:`_branches_merged`: one expand conv, BN, activation, projection for
    all branches, from their concatenated weights) and the depthwise convs through :func:`_depthwise`;
    :meth:`forward_reference` is the module-by-module definition (used under :func:`reference_forward`, and
    when forward hooks are registered on the branches)."""

    def __init__(self, spec: BlockSpec, kernel_sizes: list[int], channels: list[int], tokens: int,
                 act, bn: dict, token_size: int = 8, transformer_dropout: float = 0.1):
        super().__init__()
        self.spec = spec
        self.kernel_sizes = [k for k, c in zip(kernel_sizes, channels) if c > 0]
        self.channels = [c for c in channels if c > 0]
        self.act = act
        self.ops = nn.ModuleDict()
        for k, c in zip(self.kernel_sizes, self.channels):
            self.ops[f"k{k}"] = nn.Sequential(ConvBNAct(spec.inp, c, 1, act=act, bn=bn),
                                              ConvBNAct(c, c, k, spec.stride, groups=c, act=act, bn=bn),
                                              nn.Conv2d(c, spec.oup, 1, bias=False))
        self.pw_bn = nn.BatchNorm2d(spec.oup, **bn) if self.ops else None
        if not self.ops:  # every branch removed: what the removed channels added, as a constant
            self.register_buffer("const", torch.zeros(spec.oup))
        self.identity = spec.stride == 1 and spec.inp == spec.oup
        self.residual = None if self.identity else nn.Conv2d(
            spec.inp, spec.oup, 1, spec.stride, 0, groups=math.gcd(spec.inp, spec.oup), bias=False)
        self.transformer = Transformer(tokens, spec.inp, token_size, transformer_dropout, bn) \
            if spec.transformer and tokens > 0 else None

    def forward(self, x):
        if _REFERENCE:
            return self.forward_reference(x)
        if self.identity:
            out = self.transformer(x) if self.transformer is not None else x
        else:
            out = self.residual(x)
        if self.pw_bn is None:
            return out + self.const.view(1, -1, 1, 1)
        if len(self.ops) > 1 and self._mergeable() and not _hooked(self.ops):
            return out + self.pw_bn(self._branches_merged(x))
        y = None
        for expand, dw, proj in self.ops.values():
            t = proj(dw[2](dw[1](_depthwise(dw[0], expand(x)))))
            y = t if y is None else y + t
        return out + self.pw_bn(y)

    def _mergeable(self) -> bool:
        """Whether the branches can run merged: their BNs are plain ``nn.BatchNorm2d`` (not ``SyncBatchNorm``, whose
        statistics must go through its own forward) and agree on mode, momentum and eps (and track running
        statistics with a fixed momentum), their activations are of one type."""
        ops = list(self.ops.values())
        bns = [op[i][1] for op in ops for i in (0, 1)]
        b0 = bns[0]
        return (all(type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.momentum is not None
                    and bn.momentum == b0.momentum
                    and bn.eps == b0.eps and bn.training == b0.training for bn in bns)
                and all(type(op[i][2]) is type(ops[0][i][2]) for op in ops for i in (0, 1)))

    def _branches_merged(self, x):
        """The kernel branches as one expand conv, one BN, one activation, the depthwise convs on their channel
        slices, one BN, one activation and one projection conv (the branch sum): the same math with the branches'
        weights concatenated. Training on the CPU with a small hidden tensor, the depthwise convs run as one
        (:func:`_depthwise_merged`); with gradients off (evaluation, MACs counting) they stay one conv per kernel."""
        ops = list(self.ops.values())
        h = F.conv2d(x, torch.cat([op[0][0].weight for op in ops]))
        h = ops[0][0][2](_batch_norm_cat([op[0][1] for op in ops], h))
        convs = [op[1][0] for op in ops]
        if (h.device.type == "cpu" and torch.is_grad_enabled() and h.numel() <= MERGED_DEPTHWISE_MAX_NUMEL
                and all(_plain_depthwise(c) and c.padding[0] == c.kernel_size[0] // 2 for c in convs)):
            h = _depthwise_merged(convs, h)
        else:
            h = torch.cat([_depthwise(conv, t) for conv, t in zip(convs, h.split(self.channels, dim=1))], dim=1)
        h = ops[0][1][2](_batch_norm_cat([op[1][1] for op in ops], h))
        return F.conv2d(h, torch.cat([op[2].weight for op in ops], dim=1))

    def forward_reference(self, x):
        if self.identity:
            out = self.transformer(x) if self.transformer is not None else x
        else:
            out = self.residual(x)
        if self.pw_bn is not None:
            ops = list(self.ops.values())
            y = ops[0](x)
            for op in ops[1:]:
                y = y + op(x)
            return out + self.pw_bn(y)
        return out + self.const.view(1, -1, 1, 1)

    def depthwise_bns(self) -> dict[int, nn.BatchNorm2d]:
        """``{kernel: BN after its depthwise conv}``."""
        return {k: self.ops[f"k{k}"][1][1] for k in self.kernel_sizes}


class _Fuse:
    """Joins the branches of one stage to the next (the original's ``FuseModule`` with neighbour-only fusion):
    output i sums blocks from inputs i-1 (stride 2), i and i+1 (then 2x nearest upsampling), then the activation;
    new branches come from the previous output through a stride-2 block."""

    def __init__(self, n_in: int, n_out: int, stage: int, blocks: Mapping[str, Block], act):
        self.n_in, self.n_out, self.stage = n_in, n_out, stage
        self.new = n_out > n_in
        self.act = act()
        self.paths = [[f"s{stage}_fuse{i}_{j}" for j in range(max(0, i - 1), min(n_in, i + 2))]
                      for i in range(n_in if self.new else n_out)]
        self.new_names = [f"s{stage}_new{b}" for b in range(n_in, n_out)] if self.new else []
        self._blocks = blocks  # the network's ModuleDict (registered there, not here)

    def __call__(self, xs):
        outs = []
        for i, names in enumerate(self.paths):
            y = None
            for name in names:
                j = int(name.rsplit("_", 1)[1])
                t = self._blocks[name](xs[j])
                if j > i:
                    t = F.interpolate(t, scale_factor=2, mode="nearest")
                if y is None:
                    y = t
                else:
                    if t.shape[-2:] != y.shape[-2:]:
                        t = F.interpolate(t, size=y.shape[-2:], mode="bilinear", align_corners=False)
                    y = y + t
            outs.append(self.act(y))
        for name in self.new_names:
            outs.append(self._blocks[name](outs[-1]))
        return outs


class HRNet(nn.Module):
    """The plain HR-NAS network of (``config``, ``arch``) (``arch`` None: the supernet).

    Stem (two stride-2 conv-BN-act), then per stage a fuse step and the parallel blocks of each branch, then the
    task head: classification (incre blocks, stride-2 blocks down the branches, 1x1 conv to ``last_channel``,
    global pooling, dropout, linear), segmentation / keypoint (every branch upsampled to the first and
    concatenated, a block to ``last_channel``, 1x1 conv to the classes / joints, output at 1/4 of the input).
    All searchable blocks live in ``self.blocks`` (a ``ModuleDict`` keyed by block name).

    ``forward`` is the fast path (on CPU in channels-last, see :attr:`channels_last`; merged kernel branches, faster
    depthwise backward on small maps, fused attention projections); under :func:`reference_forward` it is the
    straightforward module-by-module definition. Both have the same parameters, buffers, outputs and gradients
    (up to float rounding; tested) and FlopCounterMode counts :func:`count_macs` on both (at batch 1; at batch b
    the fast path projects the decoder's learned queries once, not b times).
    """

    def __init__(self, config: Mapping[str, Any], arch: Mapping[str, Any] | None = None):
        super().__init__()
        cfg = make_config(**dict(config))
        arch = full_arch(cfg) if arch is None else check_arch(cfg, arch)
        self.config, self.arch = cfg, dict(arch)
        lay = layout(cfg)
        self.layout = lay
        act = ACTIVATIONS[cfg["active_fn"]]
        bn = {"momentum": cfg["bn_momentum"], "eps": cfg["bn_eps"]}
        self.stem = nn.Sequential(ConvBNAct(3, lay.stem[0], 3, 2, act=act, bn=bn),
                                  ConvBNAct(lay.stem[0], lay.stem[1], 3, 2, act=act, bn=bn))
        self.blocks = nn.ModuleDict({
            s.name: Block(s, cfg["kernel_sizes"], block_channels(cfg, arch, s.name), block_tokens(arch, s.name),
                          act, bn, cfg["token_size"], cfg["transformer_dropout"]) for s in lay.blocks})
        self._fuses = []
        n_in = 1
        for s, (n_out, _, _) in enumerate(lay.stages):
            self._fuses.append(_Fuse(n_in, n_out, s, self.blocks, act))
            n_in = n_out
        self.task = cfg["task"]
        if self.task == "classification":
            chans = lay.head_channels if lay.head_channels is not None else lay.stages[-1][2]
            self.final = ConvBNAct(chans[-1], lay.last_channel, 1, act=act, bn=bn)
            self.classifier = nn.Sequential(nn.Dropout(cfg["dropout"]), nn.Linear(lay.last_channel, cfg["num_classes"]))
        else:
            self.classifier = nn.Conv2d(lay.last_channel, cfg["num_classes"], 1)
        self._init_weights(heatmap=self.task == "keypoint")

    def _init_weights(self, heatmap: bool) -> None:
        for name, m in self.named_modules():
            if ".transformer" in name:
                continue  # xavier, set by the transformer
            if isinstance(m, nn.Conv2d):
                if heatmap:
                    nn.init.normal_(m.weight, std=0.001)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x) -> list[torch.Tensor]:
        """The branch outputs of the last stage (highest resolution first)."""
        xs = [self.stem(x)]
        for s, fuse in enumerate(self._fuses):
            xs = fuse(xs)
            n_blocks = self.layout.stages[s][1]
            for b in range(len(xs)):
                for k in range(n_blocks[b]):
                    xs[b] = self.blocks[f"s{s}_b{b}_{k}"](xs[b])
        return xs

    #: memory format of the fast forward: None = channels-last on CPU (measured faster for this depthwise-heavy
    #: net; docs/hrnas.md "Speed"), else the input's; True / False force it. Not used by :func:`reference_forward`.
    channels_last: bool | None = None

    def forward(self, x):
        if _REFERENCE:
            return self._head(self.features(x))
        cl = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._head(self.features(x))
        return out.contiguous() if out.dim() == 4 else out

    def _head(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if self.task == "classification":
            names = self.blocks.keys()
            if "head_incre0" in names:
                xs = [self.blocks[f"head_incre{i}"](t) for i, t in enumerate(xs)]
            y = xs[0]
            for i in range(len(xs) - 1):
                y = xs[i + 1] + self.blocks[f"head_down{i}"](y)
            y = self.final(y).mean(dim=(2, 3))
            return self.classifier(y)
        size = xs[0].shape[-2:]
        y = torch.cat([xs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in xs[1:]],
                      dim=1)
        return self.classifier(self.blocks["head_transform"](y))

    # searched-block access ------------------------------------------------------------------------------------
    def named_blocks(self) -> Iterable[tuple[str, Block]]:
        return self.blocks.items()

    def current_arch(self) -> dict[str, int]:
        """The arch dict this module has now."""
        return dict(self.arch)


# ---------------------------------------------------------------------------------------------------------------
# weight slicing (freeze from a supernet, physical shrinking)
# ---------------------------------------------------------------------------------------------------------------
Keep = dict[str, dict[str, torch.Tensor]]  # block name → {"k3": kept channel indices, ..., "tokens": indices}


def first_n_keep(src: HRNet, arch: Mapping[str, int]) -> Keep:
    """Keep the first channels / tokens of ``src`` (once-for-all slicing); errors if ``src`` has fewer."""
    keep: Keep = {}
    for name, block in src.named_blocks():
        have = dict(zip(block.kernel_sizes, block.channels))
        entry = {}
        for k in src.config["kernel_sizes"]:
            want = int(arch[f"{name}.k{k}"])
            if want > have.get(k, 0):
                raise RetiaError(f"arch {name}.k{k}={want}: the source network has only {have.get(k, 0)} channels there")
            if want:
                entry[f"k{k}"] = torch.arange(want)
        if block.spec.transformer:
            want, has = int(arch.get(f"{name}.tokens", 0)), (block.transformer.tokens if block.transformer else 0)
            if want > has:
                raise RetiaError(f"arch {name}.tokens={want}: the source network has only {has} tokens there")
            if want:
                entry["tokens"] = torch.arange(want)
        keep[name] = entry
    return keep


def arch_of_keep(src: HRNet, keep: Keep) -> dict[str, int]:
    arch = {}
    for name, block in src.named_blocks():
        for k in src.config["kernel_sizes"]:
            idx = keep[name].get(f"k{k}")
            arch[f"{name}.k{k}"] = 0 if idx is None else int(idx.numel())
        if block.spec.transformer:
            idx = keep[name].get("tokens")
            arch[f"{name}.tokens"] = 0 if idx is None else int(idx.numel())
    return arch


def slice_rule(name: str, keep: Keep) -> tuple[int, torch.Tensor] | None:
    """How tensor ``name`` of the smaller network is cut from the bigger one: ``(dim, indices)``, or None when it
    is copied whole."""
    if not name.startswith("blocks."):
        return None
    parts = name.split(".")
    block, rest = parts[1], parts[2:]
    entry = keep.get(block, {})
    if rest[0] == "ops":
        idx = entry[rest[1]]
        sub = ".".join(rest[2:])
        if sub.endswith("num_batches_tracked"):
            return None
        return (1, idx) if sub == "2.weight" else (0, idx)
    if rest[0] == "transformer":
        idx = entry["tokens"]
        sub = ".".join(rest[1:])
        if sub in ("input_proj.weight", "query_embed") or (sub.startswith("input_norm.")
                                                           and not sub.endswith("num_batches_tracked")):
            return 0, idx
        if sub == "reverse_proj.weight":
            return 1, idx
    return None


@torch.no_grad()
def slice_state(src: HRNet, dst: HRNet, keep: Keep) -> None:
    """Copy ``src``'s weights into the smaller ``dst`` (whose arch is ``keep``'s counts).

    Removed depthwise channels are not simply dropped: with their BN scale γ at 0 a channel outputs its BN shift
    β, i.e. a constant act(β)·W_proj[:, c] added before the block's output BN; that constant is folded into the
    output BN's running mean (or, when every branch goes, into the block's ``const``), so the smaller network
    computes exactly what the bigger one did with those scales at zero (in eval mode).
    """
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    for name, tensor in dst_state.items():
        if name.endswith(".const") and name not in src_state:
            continue  # filled below
        rule = slice_rule(name, keep)
        value = src_state[name]
        if rule is not None:
            value = value.index_select(rule[0], rule[1].to(value.device))
        if value.shape != tensor.shape:
            raise RetiaError(f"cannot slice {name}: {tuple(value.shape)} from the source into {tuple(tensor.shape)}")
        tensor.copy_(value)
    for name, sblock in src.named_blocks():
        dblock = dst.blocks[name]
        shift = torch.zeros(sblock.spec.oup)
        for k in sblock.kernel_sizes:
            op = sblock.ops[f"k{k}"]
            bn = op[1][1]
            kept = torch.zeros(bn.num_features, dtype=torch.bool)
            idx = keep[name].get(f"k{k}")
            if idx is not None:
                kept[idx] = True
            if kept.all():
                continue
            const = op[1][2](bn.bias[~kept].view(1, -1, 1, 1))  # the activation of β
            shift += (op[2].weight[:, ~kept, 0, 0] @ const.view(-1, 1)).view(-1).cpu()
        if sblock.pw_bn is None:
            dblock.const.copy_(sblock.const)
            continue
        if dblock.pw_bn is not None:
            dblock.pw_bn.running_mean.sub_(shift.to(dblock.pw_bn.running_mean))
        else:
            bn = sblock.pw_bn
            value = (shift.to(bn.running_mean) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight \
                + bn.bias
            dblock.const.copy_(value)


def extract(src: HRNet, keep: Keep) -> HRNet:
    """A new, smaller :class:`HRNet` holding the channels / tokens of ``src`` listed in ``keep``."""
    dst = HRNet(src.config, arch_of_keep(src, keep))
    slice_state(src, dst, keep)
    dst.train(src.training)
    param = next(src.parameters())
    return dst.to(param.device)


def subnet(src: HRNet, arch: Mapping[str, Any]) -> HRNet:
    """The plain network of ``arch`` with weights sliced from ``src`` (first channels / tokens)."""
    arch = check_arch(src.config, arch)
    return extract(src, first_n_keep(src, arch))
