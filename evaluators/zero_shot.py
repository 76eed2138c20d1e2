"""Zero-shot NAS proxies of Zen-NAS (Lin et al., ICCV 2021) and the baselines its paper compares against.

Every proxy is a plain function ``proxy(model_or_structure, resolution=32, batch_size=64, ..., seed=None)``
that returns one float, higher meaning better (as the original search maximises it), and every proxy is
also available by name, as :data:`PROXIES` and through the NNI evaluator :class:`ZeroShotEvaluator`.

The definitions follow the original code (idstcv/ZenNAS, ``ZeroShotProxy/`` and ``evolution_search.py``)
to the detail: which layers are re-initialised, the order of the random draws (so that a seed gives the
same numbers as the original under ``torch.manual_seed``), the train-mode BatchNorm, the aggregation and
the sign of each score. See ``docs/zero_shot.md`` for the formulas.

Model protocol (duck-typed)
---------------------------
``model_or_structure`` is an ``nn.Module`` or a Zen-NAS structure string. A string is built with
:mod:`retia.spaces.zennas` the way the original search scores candidates: residual links removed
(``no_reslink=True``), ``num_classes`` outputs. A module is used as it is; it is copied first unless
``inplace=True`` (the proxies re-initialise weights and BatchNorm statistics). The proxies need:

* inputs of shape ``(batch, in_channels, resolution, resolution)``; ``model(x)`` returns logits
  ``(batch, classes)`` (a tuple/list output is taken as ``(features, logits)``: its last element is used);
* Zen-score: pre-global-pooling features. ``model.forward_pre_GAP(x)`` when the model has it (PlainNet /
  ``retia.spaces.zennas``); otherwise the input of the last ``nn.AdaptiveAvgPool2d`` / ``nn.AdaptiveMaxPool2d``
  that runs in ``model(x)``; otherwise the last 4-D output of a leaf module. A model whose last steps are
  functional calls should define ``forward_pre_GAP``;
* NASWOT: ReLUs as modules (``nn.ReLU``, or a class named ``RELU`` as in PlainNet); their inputs give the codes;
* FLOPs / Params: ``model.get_FLOPs(resolution)`` and ``model.get_model_size()`` when present (PlainNet's
  counting: multiply-adds including BatchNorm and the classifier), else :func:`retia.profile.count_flops`
  and :func:`retia.profile.count_params`.

The proxies run on the device of the model's parameters. Computation is float32 (SynFlow: float64),
as in the original.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nni
from nni.nas.evaluator import FunctionalEvaluator

from retia.errors import RetiaError

__all__ = [
    "PROXIES",
    "ZeroShotEvaluator",
    "build_for_scoring",
    "flops_score",
    "gaussian_init_",
    "get_proxy",
    "gradnorm_score",
    "naswot_score",
    "params_score",
    "pre_gap_features",
    "random_score",
    "synflow_score",
    "te_nas_score",
    "zen_score",
]

#: num_classes of a network built from a structure string (the original CIFAR search scripts use 100).
DEFAULT_NUM_CLASSES = 100


# --------------------------------------------------------------------------------------------- helpers


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise RetiaError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise RetiaError(f"seed must be None or a non-negative integer, got {seed!r}")
    return int(seed)


def _check_common(resolution: Any, batch_size: Any, in_channels: Any, seed: Any) -> int | None:
    _check_int("resolution", resolution)
    _check_int("batch_size", batch_size)
    _check_int("in_channels", in_channels)
    return _check_seed(seed)


def _zennas():
    try:
        from retia.spaces import zennas
    except ImportError as err:  # the space is its own package; only structure strings need it
        message = f"scoring a structure string needs retia.spaces.zennas, which cannot be imported: {err}"
        raise RetiaError(message) from err
    return zennas


def _check_structure(structure: Any, num_classes: Any) -> None:
    if not isinstance(structure, str) or not structure.strip():
        raise RetiaError(f"structure must be a non-empty Zen-NAS structure string, got {structure!r}")
    _check_int("num_classes", num_classes)


def build_for_scoring(structure: str, num_classes: int = DEFAULT_NUM_CLASSES) -> nn.Module:
    """Build a Zen-NAS structure string the way the original search scores it: ``retia.spaces.zennas.build``
    with residual links removed (``no_reslink=True``), default (PyTorch) initialisation."""
    _check_structure(structure, num_classes)
    return _zennas().build(structure, num_classes=num_classes, no_reslink=True)


def _analyze_for_scoring(structure: str, resolution: int, num_classes: int) -> dict:
    """Counts of the network :func:`build_for_scoring` would build, without building it."""
    _check_structure(structure, num_classes)
    return _zennas().analyze(structure, resolution, num_classes, no_reslink=True)


def _as_model(model_or_structure: Any, num_classes: int, inplace: bool, seed: int | None = None) -> nn.Module:
    if isinstance(model_or_structure, str):
        # seeded so that the default initialisation (which TE-NAS keeps) is reproducible too
        with _seeded(seed, torch.device("cpu")):
            return build_for_scoring(model_or_structure, num_classes)
    if not isinstance(model_or_structure, nn.Module):
        raise RetiaError(
            f"expected an nn.Module or a Zen-NAS structure string, got {type(model_or_structure).__name__}"
        )
    return model_or_structure if inplace else copy.deepcopy(model_or_structure)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNGs for the block and restore the caller's RNG state afterwards (no-op for None)."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise RetiaError(f"the model must return logits of shape (batch, classes), got {shape}")
    return output


def gaussian_init_(model: nn.Module) -> nn.Module:
    """The original's re-initialisation, in module order: Conv2d and Linear weights ~ N(0, 1), their biases 0;
    BatchNorm2d / GroupNorm weight 1, bias 0. BatchNorm running statistics are left as they are."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def pre_gap_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features before global pooling (see the module docstring for the protocol)."""
    fn = getattr(model, "forward_pre_GAP", None)
    if callable(fn):
        return fn(x)
    pools = [m for m in model.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    seen: dict[str, torch.Tensor] = {}
    if pools:
        def hook(module, inputs, output):
            seen["x"] = inputs[0]
        targets = pools
    else:
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                seen["x"] = output
        targets = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if "x" not in seen:
        raise RetiaError(f"cannot find pre-GAP features of {type(model).__name__}: give it a forward_pre_GAP(x) method")
    return seen["x"]


def _is_relu(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU) or type(module).__name__ == "RELU"


def _outer_relus(model: nn.Module) -> list[nn.Module]:
    """ReLU modules, each counted once: one nested in another ReLU-like module (a wrapper) is skipped."""
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=True) if _is_relu(m)]
    names = [n for n, _ in named]
    return [m for n, m in named if not any(p != n and (p == "" or n.startswith(p + ".")) for p in names)]


# ----------------------------------------------------------------------------------------------- proxies


def zen_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    mixup_gamma: float = 1e-2,
    repeat: int = 1,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = False,
    return_info: bool = False,
) -> float | dict:
    """Zen-score: ``log(E_b ||f(x) - f(x + gamma*eps)||_1) + sum_BN log(sqrt(mean(running_var)))``.

    Per repeat: Gaussian re-init (:func:`gaussian_init_`), ``x, eps ~ N(0, 1)`` of shape
    ``(batch_size, in_channels, resolution, resolution)``, two forward passes to the pre-GAP features with
    BatchNorm in train mode (batch statistics; each pass updates the running variance with momentum), then
    the L1 difference summed per sample and averaged over the batch, logged, plus the sum over every
    ``nn.BatchNorm2d`` of ``log(sqrt(mean(running_var)))``. The score is the mean over ``repeat``; with
    ``return_info`` a dict ``{'avg_nas_score', 'std_nas_score', 'avg_precision', 'scores'}`` as the original.
    """
    seed = _check_common(resolution, batch_size, in_channels, seed)
    _check_int("repeat", repeat)
    if isinstance(mixup_gamma, bool) or not isinstance(mixup_gamma, (int, float)) or not math.isfinite(mixup_gamma):
        raise RetiaError(f"mixup_gamma must be a finite number, got {mixup_gamma!r}")
    model = _as_model(model_or_structure, num_classes, inplace, seed)
    model.train()
    device = _device(model)
    shape = (batch_size, in_channels, resolution, resolution)
    scores = []
    with _seeded(seed, device), torch.no_grad():
        for _ in range(repeat):
            gaussian_init_(model)
            x = torch.randn(shape, device=device)
            eps = torch.randn(shape, device=device)
            out = pre_gap_features(model, x)
            out_mix = pre_gap_features(model, x + mixup_gamma * eps)
            diff = torch.abs(out - out_mix).flatten(1).sum(dim=1).mean()
            log_bn = 0.0
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    log_bn = log_bn + torch.log(torch.sqrt(torch.mean(m.running_var)))
            scores.append(float(torch.log(diff) + log_bn))
    avg = float(np.mean(scores))
    if not return_info:
        return avg
    std = float(np.std(scores))
    return {"avg_nas_score": avg, "std_nas_score": std, "avg_precision": 1.96 * std / math.sqrt(len(scores)),
            "scores": scores}


def gradnorm_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = False,
) -> float:
    """GradNorm: the global L2 norm ``sqrt(sum_p ||dL/dp||^2)`` over all parameters, after Gaussian re-init,
    of the cross-entropy of ``model(x)`` (train mode, ``x ~ N(0, 1)``) against uniformly random labels."""
    seed = _check_common(resolution, batch_size, in_channels, seed)
    model = _as_model(model_or_structure, num_classes, inplace, seed)
    model.train()
    model.requires_grad_(True)
    model.zero_grad()
    device = _device(model)
    with _seeded(seed, device), torch.enable_grad():
        gaussian_init_(model)
        x = torch.randn(batch_size, in_channels, resolution, resolution).to(device)
        logits = _logits(model(x))
        classes = logits.shape[1]
        labels = torch.randint(low=0, high=classes, size=[batch_size])
        one_hot = F.one_hot(labels, classes).float().to(device)
        loss = -(one_hot * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        loss.backward()
    with torch.no_grad():
        total = sum(torch.norm(p.grad) ** 2 for p in model.parameters() if p.grad is not None)
    return float(torch.sqrt(torch.as_tensor(total)))


def naswot_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = False,
) -> float:
    """NASWOT: ``log|det K|`` of the binary-code kernel ``K = sum_ReLU (c c^T + (1-c)(1-c)^T)``, where ``c`` are
    the 0/1 codes (input > 0) of each ReLU for a Gaussian batch, after Gaussian re-init (train mode).
    ``K[i, j]`` is the number of units minus the Hamming distance of the codes of samples i and j."""
    seed = _check_common(resolution, batch_size, in_channels, seed)
    model = _as_model(model_or_structure, num_classes, inplace, seed)
    model.train()
    device = _device(model)
    kernel = np.zeros((batch_size, batch_size))

    def hook(module, inputs, output):
        nonlocal kernel
        codes = (inputs[0].reshape(inputs[0].shape[0], -1) > 0).float()
        same_on = codes @ codes.t()
        same_off = (1.0 - codes) @ (1.0 - codes).t()
        kernel = kernel + same_on.cpu().numpy() + same_off.cpu().numpy()

    relus = _outer_relus(model)
    if not relus:
        raise RetiaError(f"{type(model).__name__} has no ReLU module (nn.ReLU or RELU): NASWOT reads their inputs")
    handles = [m.register_forward_hook(hook) for m in relus]
    try:
        with _seeded(seed, device), torch.no_grad():
            gaussian_init_(model)
            x = torch.randn(batch_size, in_channels, resolution, resolution).to(device)
            model(x)
    finally:
        for h in handles:
            h.remove()
    return float(np.linalg.slogdet(kernel)[1])


def synflow_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = False,
) -> float:
    """SynFlow as the original computes it, sign included: ``-sum_layers mean_out sum_in |theta * dR/dtheta|``.

    After Gaussian re-init every parameter and buffer is replaced by its absolute value, the model goes to
    float64 (train mode) and ``R = sum(model(ones(1, in_channels, resolution, resolution)))`` is back-propagated.
    For each ``nn.Conv2d`` / ``nn.Linear`` weight, ``|theta * grad|`` is summed per output unit and averaged over
    output units; the layer values are summed and the total is NEGATED (the original returns ``-1 * score``,
    so a search maximising it prefers small SynFlow). ``batch_size`` only keeps the signature uniform.
    """
    seed = _check_common(resolution, batch_size, in_channels, seed)
    model = _as_model(model_or_structure, num_classes, inplace, seed)
    model.train()
    model.requires_grad_(True)
    model.zero_grad()
    device = _device(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with _seeded(seed, device):
        gaussian_init_(model)
        torch.randn(batch_size, in_channels, resolution, resolution)  # drawn (and unused) as in the original
    with torch.no_grad():  # keep the signs of every parameter and buffer, then take absolute values
        signs = {name: torch.sign(t) for name, t in model.state_dict().items()}
        for t in model.state_dict().values():
            t.abs_()
    model.double()
    with torch.enable_grad():
        ones = torch.ones(1, in_channels, resolution, resolution, dtype=torch.float64, device=device)
        _logits(model(ones)).sum().backward()
    score = 0.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                saliency = torch.abs(w * w.grad) if w.grad is not None else torch.zeros_like(w)
                score += float(saliency.flatten(1).sum(dim=1).mean())
        if inplace:  # hand the caller's module back with its signs and dtype
            model.zero_grad()
            model.to(dtype)
            done = set()
            for name, t in model.state_dict().items():
                if t.data_ptr() not in done:  # tied tensors appear under several names
                    done.add(t.data_ptr())
                    t.mul_(signs[name].to(t.dtype))
    return -1.0 * score


def te_nas_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = False,
) -> float:
    """TE-NAS as the original search uses it: ``-cond(NTK)``, ``NTK = J J^T``, ``cond = lambda_max / lambda_min``.

    The network keeps its current weights (the original does not re-initialise for TE-NAS) and runs in train
    mode on one Gaussian batch. Row ``i`` of ``J`` is the gradient of ``sum_c logits[i, c]`` (through the whole
    batch's graph, so train-mode BatchNorm couples the samples) with respect to every parameter whose name
    contains ``"weight"`` (BatchNorm weights included, biases excluded). A NaN ratio becomes 0, infinities the
    largest float (``numpy.nan_to_num``). The original's search score is the NTK term alone: its linear-region
    count is only used by its stand-alone script (where it hooks ``nn.ReLU``, which PlainNet does not use).
    """
    seed = _check_common(resolution, batch_size, in_channels, seed)
    model = _as_model(model_or_structure, num_classes, inplace, seed)
    model.train()
    model.requires_grad_(True)
    device = _device(model)
    weights = [p for name, p in model.named_parameters() if "weight" in name]
    if not weights:
        raise RetiaError(f"{type(model).__name__} has no parameter named '*weight*': TE-NAS needs some")
    rows = []
    with _seeded(seed, device), torch.enable_grad():
        x = torch.randn((batch_size, in_channels, resolution, resolution), device=device)
        model.zero_grad()
        logits = _logits(model(x))
        for i in range(batch_size):
            logits[i:i + 1].backward(torch.ones_like(logits[i:i + 1]), retain_graph=i < batch_size - 1)
            grads = [w.grad.reshape(-1) for w in weights if w.grad is not None]
            if not grads:
                raise RetiaError(f"no weight of {type(model).__name__} gets a gradient from its output: "
                                 "TE-NAS needs some")
            rows.append(torch.cat(grads))
            model.zero_grad()
    jac = torch.stack(rows)
    ntk = torch.einsum("nc,mc->nm", jac, jac)
    eigenvalues = torch.linalg.eigvalsh(ntk, UPLO="U")  # ascending; upper triangle, as torch.symeig did
    cond = np.nan_to_num((eigenvalues[-1] / eigenvalues[0]).item())
    return -1.0 * float(cond)


def flops_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = True,
) -> float:
    """FLOPs of one image (multiply-adds): ``model.get_FLOPs(resolution)`` when the model has it (PlainNet's
    counting, on the network built for scoring, i.e. without residual links), else
    :func:`retia.profile.count_flops` (which leaves BatchNorm out). A structure string is counted with
    ``retia.spaces.zennas.analyze(..., no_reslink=True)`` without building it. The other arguments only keep
    the signature uniform."""
    _check_common(resolution, batch_size, in_channels, seed)
    if isinstance(model_or_structure, str):
        return float(_analyze_for_scoring(model_or_structure, resolution, num_classes)["flops"])
    model = _as_model(model_or_structure, num_classes, inplace=True)
    fn = getattr(model, "get_FLOPs", None)
    if callable(fn):
        return float(fn(resolution))
    from retia.profile import count_flops

    return float(count_flops(model, (1, in_channels, resolution, resolution)))


def params_score(
    model_or_structure: nn.Module | str,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    in_channels: int = 3,
    inplace: bool = True,
) -> float:
    """Number of parameters: ``model.get_model_size()`` when the model has it (PlainNet's counting, on the
    network built for scoring, i.e. without residual links), else :func:`retia.profile.count_params`.
    The other arguments only keep the signature uniform."""
    _check_common(resolution, batch_size, in_channels, seed)
    if isinstance(model_or_structure, str):
        return float(_analyze_for_scoring(model_or_structure, resolution, num_classes)["params"])
    model = _as_model(model_or_structure, num_classes, inplace=True)
    fn = getattr(model, "get_model_size", None)
    if callable(fn):
        return float(fn())
    from retia.profile import count_params

    return float(count_params(model))


def random_score(
    model_or_structure: nn.Module | str | None = None,
    resolution: int = 32,
    batch_size: int = 64,
    seed: int | None = None,
    **_ignored: Any,
) -> float:
    """A standard-normal draw (the original's ``np.random.randn()``): from numpy's global RNG without a seed,
    else ``np.random.RandomState(seed).randn()``. The model is not looked at."""
    seed = _check_common(resolution, batch_size, 3, seed)
    if seed is None:
        return float(np.random.randn())
    return float(np.random.RandomState(seed).randn())


# ------------------------------------------------------------------------------------- registry and NNI

#: proxy name -> function(model_or_structure, resolution=32, batch_size=64, ..., seed=None, **options) -> float
PROXIES: dict[str, Callable[..., float]] = {
    "zen": zen_score,
    "gradnorm": gradnorm_score,
    "naswot": naswot_score,
    "synflow": synflow_score,
    "te_nas": te_nas_score,
    "flops": flops_score,
    "params": params_score,
    "random": random_score,
}

# the original's --zero_shot_score spellings (Zen, TE-NAS, Syncflow, GradNorm, NASWOT, Flops, Params, Random)
_ALIASES = {"tenas": "te_nas", "te": "te_nas", "syncflow": "synflow"}


def get_proxy(name: str) -> Callable[..., float]:
    """The proxy function for ``name``: a key of :data:`PROXIES`, case-insensitive, or an original spelling
    (``Zen``, ``TE-NAS``, ``Syncflow``, ``GradNorm``, ``NASWOT``, ``Flops``, ``Params``, ``Random``)."""
    return PROXIES[_canonical(name)]


def _canonical(name: Any) -> str:
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key.replace("_", ""), key)
        if key in PROXIES:
            return key
    raise RetiaError(f"unknown zero-shot proxy {name!r}: expected one of {', '.join(PROXIES)}")


class ZeroShotEvaluator(FunctionalEvaluator):
    """NNI evaluator that scores a model with a zero-shot proxy and reports it as the trial's final result.

    ``ZeroShotEvaluator(proxy='zen', **kwargs)`` calls ``PROXIES[proxy](model, **kwargs)`` on each model
    (an ``nn.Module`` or a structure string) a strategy sends, calls ``nni.report_final_result(score)`` and
    returns the score. ``kwargs`` are the proxy's keyword arguments (``resolution``, ``batch_size``, ``seed``,
    ``mixup_gamma``, ...); they are checked here. It serialises as ``(proxy, kwargs)``, like NNI's
    :class:`~nni.nas.evaluator.FunctionalEvaluator`, so it can be sent to trials.
    """

    # like FunctionalEvaluator, traceable by itself (trace_kwargs below); nni.load must not wrap it again
    _traced: ClassVar[bool] = True

    def __init__(self, proxy: str = "zen", **kwargs: Any):
        name = _canonical(proxy)
        function = PROXIES[name]
        try:
            inspect.signature(function).bind(None, **kwargs)
        except TypeError as err:
            raise RetiaError(f"bad arguments for zero-shot proxy {name!r}: {err}") from None
        super().__init__(function, **kwargs)
        self.proxy = name

    @property
    def trace_kwargs(self):
        return {"proxy": self.proxy, **self.arguments}

    def extra_repr(self):
        return f"proxy={self.proxy!r}, arguments={self.arguments!r}"

    def evaluate(self, model: Any) -> float:
        score = float(self.function(model, **self.arguments))
        nni.report_final_result(score)
        return score

    def __call__(self, model: Any) -> float:
        """Score ``model`` without reporting to NNI."""
        return float(self.function(model, **self.arguments))
