"""Computational graphs of PyTorch models for AIO-P performance predictors.

A :class:`CompGraph` has one node per primitive op (convolution, depthwise convolution, linear, norms,
activations, pooling, add, mul, concat, matmul, softmax, ...) in execution order, integer features per node
(:data:`FEATURES`: input/output resolution and channels, kernel, stride, groups, bias flag) and directed data-flow
edges. Shape-only ops (view, reshape, permute, flatten, slicing, dropout, identity) are not nodes: edges pass
through them. Parameters and constants are folded into the op that uses them (a conv's weight and bias are its
kernel/bias features), as in AIO-P's TensorFlow graphs.

It is built from the model itself:

- ``torch.fx`` symbolic tracing (leaf modules as in fx: everything in ``torch.nn`` except containers), which
  fails on data-dependent Python (e.g. NNI's frozen AutoFormer);
- a hook tracer that runs the model once: forward hooks on the same leaf modules plus a ``TorchFunctionMode``
  that records every torch function called outside them. It gives the same graph as fx wherever fx traces, in
  half the time, and also traces what fx cannot, so ``method="auto"`` uses it first and fx as the fallback.

Shapes come from one forward pass on the ``meta`` device (no arithmetic is done; parameters are swapped for meta
tensors through ``torch.func.functional_call``); a model that cannot run on ``meta`` is run once on a zero input
instead. FLOPs (multiply-adds, torch's ``FlopCounterMode`` / 2, as :func:`retia.profile.count_flops`) and
parameters are profiled in the same pass.

Files: :func:`save_graphs` writes a ``.safetensors`` file (all graphs' tensors concatenated) and a JSON sidecar
(op vocabulary, feature names, node names, FLOPs, parameters, input shapes, ...); nothing is pickled.

Command line::

    python -m retia.evaluators.aiop.graph render --model resnet18 -o g.png
    python -m retia.evaluators.aiop.graph info --model autoformer-micro
"""
from __future__ import annotations

import argparse
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from retia.errors import RetiaError

__all__ = ["OP_TYPES", "OP_INDEX", "FEATURES", "CompGraph", "build_graph", "save_graphs", "load_graphs",
           "save_graph", "load_graph", "named_model", "render", "main"]

#: Op vocabulary; a node's ``op_index`` is its position here. New types are appended, never reordered.
OP_TYPES: tuple[str, ...] = (
    "input", "output", "conv", "depthwise_conv", "group_conv", "conv_transpose", "linear", "batchnorm",
    "layernorm", "groupnorm", "instancenorm", "relu", "relu6", "leaky_relu", "prelu", "elu", "gelu", "silu",
    "sigmoid", "tanh", "hardswish", "hardsigmoid", "softmax", "maxpool", "avgpool", "global_avgpool",
    "adaptive_maxpool", "add", "sub", "mul", "div", "matmul", "concat", "mean", "sum", "pad", "upsample",
    "embedding", "attention", "pow", "sqrt", "exp", "neg", "other",
)
OP_INDEX: dict[str, int] = {name: i for i, name in enumerate(OP_TYPES)}
#: Integer feature columns of every node (0 where an op has no such attribute).
FEATURES: tuple[str, ...] = ("h_in", "w_in", "c_in", "h_out", "w_out", "c_out", "kernel_h", "kernel_w",
                             "stride_h", "stride_w", "groups", "bias")
WEIGHTED = frozenset({"conv", "depthwise_conv", "group_conv", "conv_transpose", "linear", "embedding", "attention"})


@dataclass
class CompGraph:
    """One model's computational graph. ``ops[i]`` is node i's op type, ``features[i]`` its :data:`FEATURES`,
    ``edge_index`` a ``[2, E]`` long tensor of (source, target) node indices; nodes are in execution order, node 0
    is the input and the last node the output."""

    ops: list[str]
    features: torch.Tensor
    edge_index: torch.Tensor
    names: list[str] = field(default_factory=list)
    name: str = ""
    input_shape: tuple[int, ...] = ()
    flops: int | None = None
    params: int | None = None
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return len(self.ops)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def op_index(self) -> torch.Tensor:
        """Node op types as indices into :data:`OP_TYPES` (unknown names map to ``other``)."""
        return torch.tensor([OP_INDEX.get(op, OP_INDEX["other"]) for op in self.ops], dtype=torch.long)

    def feature(self, node: int, name: str) -> int:
        return int(self.features[node, FEATURES.index(name)])

    def nodes_of(self, op: str) -> list[int]:
        return [i for i, o in enumerate(self.ops) if o == op]

    def edges(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.edge_index.t().tolist()]

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op] = out.get(op, 0) + 1
        return out

    def to_networkx(self):
        import networkx as nx

        g = nx.DiGraph()
        for i, op in enumerate(self.ops):
            g.add_node(i, op=op, name=self.names[i] if i < len(self.names) else "",
                       **{k: int(v) for k, v in zip(FEATURES, self.features[i].tolist())})
        g.add_edges_from(self.edges())
        return g

    def __repr__(self) -> str:
        return (f"CompGraph({self.name or 'model'}: {self.num_nodes} nodes, {self.num_edges} edges, "
                f"flops={self.flops}, params={self.params}, via {self.method})")


# ---------------------------------------------------------------------------------------------------------------
# op classification
# ---------------------------------------------------------------------------------------------------------------
_PAIR = Callable[[Any], tuple[int, int]]


def _pair(v: Any) -> tuple[int, int]:
    if v is None:
        return (0, 0)
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[-2], v[-1])


_ACTIVATIONS = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Softmax: "softmax", nn.LogSoftmax: "softmax", nn.Mish: "other",
}
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
                 nn.Unflatten, nn.ChannelShuffle)


def _classify_module(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(op, attrs) for a leaf module; None for a shape-only module (its output is its input)."""
    if isinstance(m, _PASS_MODULES):
        return None
    if isinstance(m, nn.modules.conv._ConvNd):
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        if transposed:
            op = "conv_transpose"
        elif m.groups > 1 and m.groups == m.in_channels:
            op = "depthwise_conv"
        elif m.groups > 1:
            op = "group_conv"
        else:
            op = "conv"
        return op, {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "groups": m.groups,
                    "bias": m.bias is not None}
    if isinstance(m, nn.Linear):
        return "linear", {"kernel": (1, 1), "stride": (1, 1), "groups": 1, "bias": m.bias is not None}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", {"bias": m.affine}
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instancenorm", {"bias": m.affine}
    if isinstance(m, nn.LayerNorm):
        return "layernorm", {"bias": getattr(m, "bias", None) is not None}
    if isinstance(m, nn.GroupNorm):
        return "groupnorm", {"groups": m.num_groups, "bias": m.affine}
    for cls, op in _ACTIVATIONS.items():
        if isinstance(m, cls):
            return op, {}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return "maxpool", {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride)}
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return "avgpool", {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride)}
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return "adaptive_avgpool", {}
    if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return "adaptive_maxpool", {}
    if isinstance(m, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle)):
        return "upsample", {}
    if isinstance(m, nn.modules.padding._ReflectionPadNd) or "Pad" in type(m).__name__:
        return "pad", {}
    if isinstance(m, nn.Embedding):
        return "embedding", {"bias": False}
    if isinstance(m, nn.MultiheadAttention):
        return "attention", {"bias": m.in_proj_bias is not None}
    return "other", {}


# torch function / tensor method names (dunders stripped, in-place ``_`` suffix stripped) -> op, None = passthrough
_FUNCTION_OPS: dict[str, str | None] = {
    "add": "add", "radd": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "rmul": "mul", "div": "div",
    "truediv": "div", "rtruediv": "div", "floordiv": "div", "true_divide": "div", "matmul": "matmul",
    "rmatmul": "matmul", "bmm": "matmul", "mm": "matmul", "einsum": "matmul", "baddbmm": "matmul",
    "addmm": "linear", "linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "cat": "concat", "concat": "concat", "concatenate": "concat", "stack": "concat", "relu": "relu",
    "relu6": "relu6", "leaky_relu": "leaky_relu", "gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid",
    "tanh": "tanh", "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "elu": "elu", "softmax": "softmax",
    "log_softmax": "softmax", "max_pool1d": "maxpool", "max_pool2d": "maxpool", "max_pool3d": "maxpool",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "adaptive_avgpool", "adaptive_avg_pool2d": "adaptive_avgpool",
    "adaptive_avg_pool3d": "adaptive_avgpool", "adaptive_max_pool2d": "adaptive_maxpool", "mean": "mean",
    "sum": "sum", "layer_norm": "layernorm", "batch_norm": "batchnorm", "group_norm": "groupnorm",
    "pad": "pad", "interpolate": "upsample", "upsample": "upsample", "pow": "pow", "sqrt": "sqrt",
    "rsqrt": "sqrt", "exp": "exp", "neg": "neg", "scaled_dot_product_attention": "attention",
    # shape-only / identity-like: edges pass through
    "view": None, "reshape": None, "flatten": None, "unflatten": None, "permute": None, "transpose": None,
    "t": None, "contiguous": None, "expand": None, "expand_as": None, "repeat": None, "unsqueeze": None,
    "squeeze": None, "getitem": None, "chunk": None, "split": None, "unbind": None, "narrow": None,
    "clone": None, "detach": None, "to": None, "type": None, "float": None, "half": None, "double": None,
    "dropout": None, "dropout1d": None, "dropout2d": None, "drop_path": None, "roll": None, "flip": None,
    "view_as": None, "reshape_as": None, "movedim": None, "swapaxes": None, "tensor_split": None,
    "masked_fill": None, "index_select": None, "gather": None, "cpu": None, "cuda": None, "requires_grad": None,
    "channel_shuffle": None, "stochastic_depth": None, "pixel_shuffle": "upsample", "identity": None, "abs": "other",
}
# results that are never graph values (sizes, dtypes, python numbers)
_IGNORE = frozenset({"size", "dim", "shape", "numel", "ndim", "len", "get", "device", "dtype", "is_floating_point",
                     "item", "tolist", "format", "repr", "bool", "int", "index", "eq", "ne", "lt", "gt", "le", "ge",
                     "is_contiguous", "data_ptr", "element_size", "stride", "storage_offset", "requires_grad_",
                     "is_complex", "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like",
                     "empty_like", "full_like", "rand_like", "randn_like", "arange", "zeros", "ones"})


def _canonical_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # property getters (Tensor.shape, ...)
        name = getattr(getattr(func, "__self__", None), "__name__", "get")
    name = name.strip("_")
    if name.startswith("i") and name[1:] in {"add", "sub", "mul", "truediv", "div", "matmul"}:  # __iadd__ ...
        name = name[1:]
    if name.endswith("_") and name[:-1] in _FUNCTION_OPS:  # relu_, add_ ...
        name = name[:-1]
    return name


def _classify_function(name: str, args: tuple, kwargs: dict) -> tuple[str, dict[str, Any]] | None | bool:
    """(op, attrs); None = passthrough; False = ignore (no graph value)."""
    if name in _IGNORE:
        return False
    if name not in _FUNCTION_OPS:
        return "other", {}
    op = _FUNCTION_OPS[name]
    if op is None:
        return None
    attrs: dict[str, Any] = {}
    if op == "conv":
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        shape = tuple(getattr(w, "shape", ()))
        if len(shape) >= 3:
            attrs["kernel"] = _pair(shape[2:])
            if groups > 1:
                op = "depthwise_conv" if shape[1] == 1 else "group_conv"
        attrs.update(stride=_pair(stride), groups=int(groups), bias=b is not None)
    elif op == "linear":
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if name == "addmm":
            b = args[0]
        attrs.update(kernel=(1, 1), stride=(1, 1), groups=1, bias=b is not None)
    elif op in ("maxpool", "avgpool"):
        k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        s = args[2] if len(args) > 2 else kwargs.get("stride")
        attrs.update(kernel=_pair(k), stride=_pair(s if s not in (None, ()) else k))
    return op, attrs


def _hwc(shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(H, W, C) of a tensor shape: NCHW images, (B, tokens, C) sequences, (B, C) vectors."""
    if not shape:
        return (1, 1, 1)
    s = [int(v) for v in shape]
    if len(s) >= 4:
        return (s[-2], s[-1], int(math.prod(s[1:-2])))
    if len(s) == 3:
        return (s[1], 1, s[2])
    if len(s) == 2:
        return (1, 1, s[1])
    return (1, 1, s[0])


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)

    walk(obj)
    return out


class _Builder:
    """Collects nodes and edges; both tracers feed it."""

    def __init__(self) -> None:
        self.ops: list[str] = []
        self.names: list[str] = []
        self.feats: list[list[int]] = []
        self.edges: set[tuple[int, int]] = set()

    def add(self, op: str, name: str, sources: Iterable[int], in_shape: Any, out_shape: Any,
            attrs: dict[str, Any]) -> int:
        idx = len(self.ops)
        if op == "adaptive_avgpool":
            hw = _hwc(out_shape)
            op = "global_avgpool" if hw[0] == 1 and hw[1] == 1 else "avgpool"
        if op == "mean" and out_shape is not None and in_shape is not None and len(in_shape) == 4 and \
                len(out_shape) in (2, 4) and _hwc(out_shape)[:2] == (1, 1):
            op = "global_avgpool"
        hi, wi, ci = _hwc(in_shape)
        ho, wo, co = _hwc(out_shape)
        kh, kw = attrs.get("kernel", (0, 0))
        if op in ("global_avgpool", "adaptive_maxpool") and "kernel" not in attrs:
            kh, kw = hi // max(ho, 1), wi // max(wo, 1)
        sh, sw = attrs.get("stride", (0, 0))
        self.ops.append(op)
        self.names.append(name)
        self.feats.append([hi, wi, ci, ho, wo, co, kh, kw, sh, sw, int(attrs.get("groups", 0)),
                           int(bool(attrs.get("bias", False)))])
        for s in sources:
            self.edges.add((s, idx))
        return idx

    def graph(self, **kw: Any) -> CompGraph:
        # drop ops whose result never reaches the output (e.g. a value only read by Python control flow)
        n = len(self.ops)
        preds: dict[int, list[int]] = {}
        for a, b in self.edges:
            preds.setdefault(b, []).append(a)
        live, stack = {0, n - 1}, [n - 1]
        while stack:
            for a in preds.get(stack.pop(), ()):
                if a not in live:
                    live.add(a)
                    stack.append(a)
        if len(live) < n:
            keep = sorted(live)
            new = {old: i for i, old in enumerate(keep)}
            self.ops = [self.ops[i] for i in keep]
            self.names = [self.names[i] for i in keep]
            self.feats = [self.feats[i] for i in keep]
            self.edges = {(new[a], new[b]) for a, b in self.edges if a in new and b in new}
        edges = sorted(self.edges)
        ei = torch.tensor(edges, dtype=torch.long).t().contiguous() if edges else torch.zeros(2, 0, dtype=torch.long)
        return CompGraph(ops=self.ops, features=torch.tensor(self.feats, dtype=torch.long).reshape(-1, len(FEATURES)),
                         edge_index=ei, names=self.names, **kw)


def _is_leaf(m: nn.Module) -> bool:
    """fx's default leaf rule: modules from torch.nn, except containers."""
    return (m.__module__.startswith("torch.nn") or m.__module__.startswith("torch.ao.nn")) and \
        not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


# ---------------------------------------------------------------------------------------------------------------
# shape pass: meta device (no arithmetic), else real zeros
# ---------------------------------------------------------------------------------------------------------------
# Ops whose output has its first input's shape and which FlopCounterMode does not count: on meta tensors they are
# answered with ``empty_like`` instead of torch's (slow, Python) meta decompositions.
_SHAPE_KEEPING = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "relu", "relu6", "hardtanh",
                            "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu",
                            "softmax", "log_softmax", "dropout", "dropout1d", "dropout2d", "mish", "prelu"})


def _meta_shortcut(func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """``(True, result)`` when ``func`` keeps its input's shape and its input is a meta tensor."""
    name = getattr(func, "__name__", "")
    inplace = name.endswith("_") and not name.endswith("__")
    key = name.strip("_")
    if key not in _SHAPE_KEEPING:
        return False, None
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.device.type != "meta":
        return False, None
    if inplace or kwargs.get("inplace") or (key in ("relu", "relu6", "hardtanh", "silu", "hardswish", "hardsigmoid",
                                                     "leaky_relu", "elu", "dropout") and _inplace_arg(key, args)):
        return True, x
    return True, torch.empty_like(x)


def _inplace_arg(key: str, args: tuple) -> bool:
    # F.relu(x, True), F.dropout(x, p, training, True), F.hardtanh(x, min, max, True), F.leaky_relu(x, slope, True)
    pos = {"relu": 1, "relu6": 1, "silu": 1, "hardswish": 1, "hardsigmoid": 1, "elu": 2, "leaky_relu": 2,
           "hardtanh": 3, "dropout": 3}[key]
    return len(args) > pos and args[pos] is True


def _fast_meta_mode():
    from torch.overrides import TorchFunctionMode

    class FastMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            hit, out = _meta_shortcut(func, args, kwargs)
            return out if hit else func(*args, **kwargs)

    return FastMeta()


def _run(fn: Callable[[torch.Tensor], Any], model: nn.Module, input_shape: tuple[int, ...], profile: bool,
         device: str) -> tuple[Any, int | None]:
    from torch.utils.flop_counter import FlopCounterMode

    if device == "meta":
        from torch.func import functional_call

        state = {k: torch.empty_like(v, device="meta") for k, v in
                 list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}
        x = torch.empty(input_shape, device="meta")

        def call(inp: torch.Tensor) -> Any:
            return functional_call(model, state, (inp,), strict=False, tie_weights=True) if fn is None else fn(inp, state)
    else:
        param = next(model.parameters(), None)
        x = torch.zeros(input_shape, device=param.device if param is not None else "cpu")

        def call(inp: torch.Tensor) -> Any:
            return model(inp) if fn is None else fn(inp, None)

    with torch.no_grad():
        if profile:
            counter = FlopCounterMode(display=False)
            with counter:
                out = call(x)
            return out, counter.get_total_flops() // 2
        return call(x), None


def _trace_fx(model: nn.Module, input_shape: tuple[int, ...], profile: bool, device: str) -> tuple[_Builder, int | None]:
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    def run(x: torch.Tensor, state: dict | None) -> Any:
        if state is not None:  # swap in meta parameters for the interpreter's get_attr / call_module
            from torch.nn.utils.stateless import _reparametrize_module

            with _reparametrize_module(gm, state, strict=False), _fast_meta_mode():
                return Recorder(gm).run(x)
        return Recorder(gm).run(x)

    _, flops = _run(run, model, input_shape, profile, device)

    b = _Builder()
    producers: dict[fx.Node, frozenset[int]] = {}
    for n in gm.graph.nodes:
        ins = [a for a in n.all_input_nodes]
        src = frozenset().union(*(producers.get(a, frozenset()) for a in ins)) if ins else frozenset()
        graph_in = next((a for a in ins if producers.get(a)), None)
        in_t = _first_tensor(values.get(graph_in)) if graph_in is not None else None
        out_t = _first_tensor(values.get(n))
        if n.op == "placeholder":
            producers[n] = frozenset({b.add("input", n.name, (), out_t.shape if out_t is not None else None,
                                            out_t.shape if out_t is not None else None, {})})
            continue
        if n.op == "get_attr":
            producers[n] = frozenset()
            continue
        if n.op == "output":
            b.add("output", "output", sorted(src), in_t.shape if in_t is not None else None,
                  in_t.shape if in_t is not None else None, {})
            continue
        if n.op == "call_module":
            cls = _classify_module(modules[n.target])
        else:
            cls = _classify_function(_canonical_name(n.target) if n.op == "call_function" else n.target.strip("_"),
                                     n.args, n.kwargs)
            if cls and cls[0] == "conv":  # functional conv: weight shape from the recorded value
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                cls = _classify_function("conv2d", (None, values.get(w), *n.args[2:]), n.kwargs)
        if cls is False or (not src and cls is not None):
            producers[n] = frozenset()  # a constant, or not a tensor value
            continue
        if cls is None or _first_tensor(values.get(n)) is None:
            producers[n] = src
            continue
        op, attrs = cls
        producers[n] = frozenset({b.add(op, str(n.target) if n.op != "call_function" else n.name, sorted(src),
                                        in_t.shape if in_t is not None else None, out_t.shape, attrs)})
    return b, flops


def _trace_hooks(model: nn.Module, input_shape: tuple[int, ...], profile: bool, device: str) -> tuple[_Builder, int | None]:
    from torch.overrides import TorchFunctionMode

    b = _Builder()
    producers: dict[int, tuple[frozenset[int], torch.Tensor]] = {}
    state = {"depth": 0, "busy": False}

    def src_of(obj: Any) -> tuple[frozenset[int], torch.Tensor | None]:
        src: frozenset[int] = frozenset()
        first = None
        for t in _tensors(obj):
            p = producers.get(id(t))
            if p and p[0]:
                src = src | p[0]
                if first is None:
                    first = t
        return src, first

    def record(op_cls: Any, name: str, inputs: Any, output: Any) -> None:
        src, in_t = src_of(inputs)
        outs = _tensors(output)
        if op_cls is False or not outs:
            return
        if not src:
            for t in outs:
                producers.pop(id(t), None)
            return
        if op_cls is None:
            for t in outs:
                producers[id(t)] = (src, t)
            return
        op, attrs = op_cls
        idx = b.add(op, name, sorted(src), in_t.shape if in_t is not None else None, outs[0].shape, attrs)
        for t in outs:
            producers[id(t)] = (frozenset({idx}), t)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            hit, out = _meta_shortcut(func, args, kwargs)
            if not hit:
                out = func(*args, **kwargs)
            if state["depth"] == 0 and not state["busy"]:
                state["busy"] = True
                try:
                    name = _canonical_name(func)
                    record(_classify_function(name, args, kwargs), name, (args, kwargs), out)
                finally:
                    state["busy"] = False
            return out

    leaves = {m: name for name, m in model.named_modules() if _is_leaf(m) and m is not model}
    handles = []

    def pre(m: nn.Module, inputs: Any) -> None:
        state["depth"] += 1

    def post(m: nn.Module, inputs: Any, output: Any) -> None:
        state["depth"] -= 1
        if state["depth"] == 0:
            state["busy"] = True
            try:
                record(_classify_module(m), leaves[m], inputs, output)
            finally:
                state["busy"] = False

    for m in leaves:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))

    def run(x: torch.Tensor, params: dict | None) -> Any:
        producers[id(x)] = (frozenset({b.add("input", "x", (), x.shape, x.shape, {})}), x)
        with Mode():
            if params is not None:
                from torch.func import functional_call

                out = functional_call(model, params, (x,), strict=False, tie_weights=True)
            else:
                out = model(x)
        src, t = src_of(out)
        b.add("output", "output", sorted(src), t.shape if t is not None else None,
              t.shape if t is not None else None, {})
        return out

    try:
        _, flops = _run(run, model, input_shape, profile, device)
    finally:
        for h in handles:
            h.remove()
    return b, flops


def build_graph(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224), *, name: str = "",
                method: str = "auto", profile: bool = True, meta: dict[str, Any] | None = None) -> CompGraph:
    """The computational graph of ``model`` for an input of ``input_shape``.

    ``method``: ``fx``, ``hooks`` or ``auto``. Both tracers give the same graph wherever fx can trace (tested on
    torchvision and Zen-NAS models); the hook tracer is about twice as fast and also handles code fx cannot trace,
    so ``auto`` uses it first and fx only if the model does not run under it. ``profile`` adds ``flops``
    (multiply-adds, as :func:`retia.profile.count_flops`) and ``params``. The model is traced in eval mode and
    left in the mode it had.
    """
    if not isinstance(model, nn.Module):
        raise RetiaError(f"model {type(model).__name__!r}: expected a torch.nn.Module")
    shape = tuple(int(v) for v in input_shape) if isinstance(input_shape, (list, tuple)) else ()
    if not shape or any(v <= 0 for v in shape):
        raise RetiaError(f"input_shape {input_shape!r}: expected a tuple of positive ints such as (1, 3, 224, 224)")
    if method not in ("auto", "fx", "hooks"):
        raise RetiaError(f"graph method {method!r}: expected one of auto, fx, hooks")
    tracers = {"fx": _trace_fx, "hooks": _trace_hooks}
    order = ["hooks", "fx"] if method == "auto" else [method]
    was_training = model.training
    model.eval()
    errors = []
    try:
        for m in order:
            for device in ("meta", "real"):
                try:
                    builder, flops = tracers[m](model, shape, profile, device)
                except RetiaError:
                    raise
                except Exception as exc:  # fx cannot trace it, or it does not run on meta: try the next way
                    errors.append(f"{m}/{device}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                if len(builder.ops) < 2 or builder.ops[-1] != "output":
                    errors.append(f"{m}/{device}: no output")
                    continue
                from retia.profile import count_params

                return builder.graph(name=name, input_shape=shape, flops=flops,
                                     params=count_params(model) if profile else None, method=f"{m}/{device}",
                                     meta=dict(meta or {}))
    finally:
        model.train(was_training)
    raise RetiaError(f"cannot build a graph of {type(model).__name__} for input {shape}: {'; '.join(errors)}")


# ---------------------------------------------------------------------------------------------------------------
# files: safetensors + JSON sidecar
# ---------------------------------------------------------------------------------------------------------------
FORMAT = "retia.aiop.graphs/1"


def save_graphs(graphs: Sequence[CompGraph], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``graphs`` to ``path`` (.safetensors: concatenated features, op indices and edges with offsets) and
    ``path.json`` (vocabulary, names, FLOPs, params, input shapes, per-graph meta, ``meta``)."""
    from retia.weights import save_weights

    graphs = list(graphs)
    if not graphs or not all(isinstance(g, CompGraph) for g in graphs):
        raise RetiaError("save_graphs: expected a non-empty list of CompGraph")
    node_ptr = [0]
    edge_ptr = [0]
    for g in graphs:
        node_ptr.append(node_ptr[-1] + g.num_nodes)
        edge_ptr.append(edge_ptr[-1] + g.num_edges)
    tensors = {
        "features": torch.cat([g.features for g in graphs]).to(torch.int64),
        "op_index": torch.cat([g.op_index for g in graphs]),
        "edge_index": torch.cat([g.edge_index for g in graphs], dim=1).to(torch.int64),
        "node_ptr": torch.tensor(node_ptr, dtype=torch.int64),
        "edge_ptr": torch.tensor(edge_ptr, dtype=torch.int64),
    }
    side = {"format": FORMAT, "op_types": list(OP_TYPES), "features": list(FEATURES), "meta": meta or {},
            "graphs": [{"name": g.name, "input_shape": list(g.input_shape), "flops": g.flops, "params": g.params,
                        "method": g.method, "ops": g.ops, "names": g.names, "meta": g.meta} for g in graphs]}
    return save_weights(tensors, path, meta=side)


def load_graphs(path: str | Path) -> list[CompGraph]:
    """Graphs written by :func:`save_graphs`."""
    from retia.weights import load_meta, load_weights

    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetiaError(f"graph file {str(path)!r}: expected a .safetensors file")
    tensors = load_weights(path)
    side = load_meta(path)
    if not side or side.get("format") != FORMAT:
        raise RetiaError(f"graph file {str(path)!r} has no {FORMAT} JSON sidecar ({path.with_suffix('.json').name})")
    if list(side["features"]) != list(FEATURES):
        raise RetiaError(f"graph file {str(path)!r} has features {side['features']}, expected {list(FEATURES)}")
    need = {"features", "op_index", "edge_index", "node_ptr", "edge_ptr"}
    if not need <= set(tensors):
        raise RetiaError(f"graph file {str(path)!r} lacks tensors {sorted(need - set(tensors))}")
    npt, ept = tensors["node_ptr"].tolist(), tensors["edge_ptr"].tolist()
    if len(npt) != len(side["graphs"]) + 1:
        raise RetiaError(f"graph file {str(path)!r}: {len(npt) - 1} graphs in tensors, {len(side['graphs'])} in JSON")
    out = []
    for i, info in enumerate(side["graphs"]):
        ops = info.get("ops") or [side["op_types"][j] for j in tensors["op_index"][npt[i]:npt[i + 1]].tolist()]
        out.append(CompGraph(ops=list(ops), features=tensors["features"][npt[i]:npt[i + 1]].clone(),
                             edge_index=tensors["edge_index"][:, ept[i]:ept[i + 1]].clone(),
                             names=list(info.get("names", [])), name=info.get("name", ""),
                             input_shape=tuple(info.get("input_shape", ())), flops=info.get("flops"),
                             params=info.get("params"), method=info.get("method", ""), meta=info.get("meta", {})))
    return out


def save_graph(graph: CompGraph, path: str | Path) -> Path:
    return save_graphs([graph], path)


def load_graph(path: str | Path) -> CompGraph:
    graphs = load_graphs(path)
    if len(graphs) != 1:
        raise RetiaError(f"graph file {str(path)!r} holds {len(graphs)} graphs; use load_graphs")
    return graphs[0]


# ---------------------------------------------------------------------------------------------------------------
# named models (for the command line and the benchmark) and rendering
# ---------------------------------------------------------------------------------------------------------------
AUTOFORMER_MICRO_ARCH = {"embed_dim": 64, "depth": 3, "mlp_ratio_0": 3.0, "num_head_0": 2, "mlp_ratio_1": 4.0,
                         "num_head_1": 1, "mlp_ratio_2": 2.0, "num_head_2": 2}


def named_model(name: str, resolution: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, input_shape)`` for a name: a torchvision model (``resnet18``, ``mobilenet_v3_small``, ...),
    ``autoformer-micro`` (a fixed micro subnet), ``autoformer-tiny|small|base`` (the paper's searched subnets), a
    Zen-NAS zoo name (``zennet_cifar10_model_size05M_res32``) or ``zennas:<structure string>``."""
    if name.startswith("autoformer-"):
        from retia.spaces.autoformer import AutoformerSpace

        if name == "autoformer-micro":
            cfg = AutoformerSpace.config("micro")
            model = AutoformerSpace.build_subnet(AUTOFORMER_MICRO_ARCH, cfg)
        else:
            preset, _ = AutoformerSpace.searched_arch(name)
            cfg = AutoformerSpace.config(preset)
            model = AutoformerSpace.load_searched_model(name)
        res = resolution or cfg["img_size"]
        return model, (1, 3, res, res)
    if name.startswith("zennet_") or name.startswith("zennas:"):
        from retia.spaces import zennas

        if name.startswith("zennas:"):
            model = zennas.build(name.split(":", 1)[1], num_classes=10)
            res = resolution or 32
        else:
            info = zennas.zoo.model_info(name)
            model = zennas.zoo.create_model(name)
            res = resolution or info["resolution"]
        return model, (1, 3, res, res)
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError):
        raise RetiaError(f"model {name!r}: expected a torchvision model name, autoformer-micro|tiny|small|base, "
                         "a zennet_* zoo name or zennas:<structure>") from None
    res = resolution or 224
    return model, (1, 3, res, res)


def _layers(g: CompGraph) -> list[int]:
    """Longest-path depth of every node (nodes are in execution order, so one pass suffices)."""
    depth = [0] * g.num_nodes
    for a, b in sorted(g.edges(), key=lambda e: e[1]):
        depth[b] = max(depth[b], depth[a] + 1)
    return depth


def render(graph: CompGraph, path: str | Path, *, title: str | None = None, labels: bool = True) -> Path:
    """Draw ``graph`` top to bottom (depth = longest path from the input) with networkx + matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = graph.to_networkx()
    depth = _layers(graph)
    rows: dict[int, list[int]] = {}
    for i, d in enumerate(depth):
        rows.setdefault(d, []).append(i)
    pos = {}
    for d, nodes in rows.items():
        for j, i in enumerate(nodes):
            pos[i] = (j - (len(nodes) - 1) / 2, -d)
    width = max(len(v) for v in rows.values())
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * width), max(4, 0.45 * len(rows))))
    cmap = plt.get_cmap("tab20")
    colors = [cmap(OP_INDEX.get(op, 0) % 20) for op in graph.ops]
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=6, width=0.6, edge_color="#555555",
                           node_size=220)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=220, linewidths=0.3, edgecolors="black")
    if labels:
        def label(i: int) -> str:
            f = dict(zip(FEATURES, graph.features[i].tolist()))
            text = graph.ops[i]
            if f["kernel_h"] and graph.ops[i] not in ("linear",):
                text += f" {f['kernel_h']}x{f['kernel_w']}/{f['stride_h']}"
            return text + f"\n{f['c_out']}@{f['h_out']}x{f['w_out']}"

        nx.draw_networkx_labels(g, {i: (x + 0.08, y) for i, (x, y) in pos.items()},
                                {i: label(i) for i in g.nodes}, ax=ax, font_size=5, horizontalalignment="left")
    ax.set_title(title or f"{graph.name or 'model'}: {graph.num_nodes} nodes, {graph.num_edges} edges, "
                          f"{(graph.flops or 0) / 1e6:.1f}M MACs, {(graph.params or 0) / 1e6:.2f}M params")
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retia.evaluators.aiop.graph",
                                     description="Computational graphs of models (AIO-P)")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("render", "info"):
        p = sub.add_parser(cmd)
        p.add_argument("--model", required=True, help="resnet18 | autoformer-micro | zennet_... | zennas:<structure>")
        p.add_argument("--resolution", type=int, default=None, help="input side (default: the model's own)")
        p.add_argument("--method", default="auto", choices=["auto", "fx", "hooks"])
        p.add_argument("--save", default=None, help="also write the graph to this .safetensors file (+ .json)")
        if cmd == "render":
            p.add_argument("-o", "--output", default="graph.png", help="image file (default: %(default)s)")
            p.add_argument("--no-labels", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, shape = named_model(args.model, args.resolution)
    graph = build_graph(model, shape, name=args.model, method=args.method)
    print(graph)
    print(json.dumps(graph.op_counts()))
    if args.save:
        print(f"saved {save_graph(graph, args.save)}")
    if args.command == "render":
        print(f"wrote {render(graph, args.output, labels=not args.no_labels)}")


if __name__ == "__main__":
    from retia.cli import run_main

    run_main(main)
