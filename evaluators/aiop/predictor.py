"""AIO-P performance predictors on computational graphs (:mod:`retia.evaluators.aiop.graph`).

Every predictor has the same small interface::

    p.fit(graphs, targets) -> p          # targets: one number per graph (accuracy, mAP, PCK, ...)
    p.predict(graphs) -> np.ndarray      # in the targets' own units
    p.save(path)                         # path.safetensors + path.json
    load_predictor(path) -> Predictor    # any kind, by the JSON's "kind"

- :class:`GNNPredictor`: AIO-P's regressor. Node embedding = op-type embedding + a linear map of the shape
  features (resolution / channels, log-scaled, plus AIO-P's per-graph relative values) + kernel-size embeddings +
  bias flag; ``layers`` k-GNN layers (``torch_geometric.nn.GraphConv``) with tanh; mean pooling over nodes; an MLP
  head. ``fine_tune(graphs, targets)`` returns a copy trained further on a few architectures of a target family.
- :class:`KAdapterPredictor`: AIO-P's K-adapter: the base GNN frozen, parallel adapter GNN layers (each fed the
  base layer's output and the previous adapter output) and a new head trained on another family's labels.
- :class:`FlopsPredictor`, :class:`ParamsPredictor`: baselines, a least-squares line on log10(FLOPs) / log10(params)
  fitted on the training graphs.

Target normalisation (:class:`TargetNormalizer`, AIO-P's ``-tar_norm``): ``stand`` standardises the targets with
the mean / s.d. of the *training* targets; ``stand_flops`` first divides each target by ``log10(GFLOPs + 1) + 1``
(GFLOPs = multiply-adds / 1e9 of that graph's model), then standardises; predictions are mapped back with the
inverse. Statistics only ever come from the targets passed to ``fit`` / ``fine_tune``.

Metrics (:func:`regression_metrics`): SRCC, Kendall tau-b, MAE, MAPE (a fraction, as scikit-learn), MSE.
"""
from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from retia.errors import RetiaError

from .graph import FEATURES, OP_TYPES, CompGraph

__all__ = ["TargetNormalizer", "regression_metrics", "spearman", "kendall_tau", "Predictor", "GNNPredictor",
           "KAdapterPredictor", "FlopsPredictor", "ParamsPredictor", "GraphStatsPredictor", "load_predictor",
           "evaluate_seeds", "split_family", "graph_tensors"]

NORMS = ("none", "stand", "stand_flops")


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks)."""
    ra, rb = _rank(np.asarray(a, dtype=np.float64)), _rank(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence corrected), O(n^2) in row blocks."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(x)
    s = tx = ty = 0.0
    for start in range(0, n, 512):
        sl = slice(start, min(n, start + 512))
        dx = np.sign(x[sl, None] - x[None, :])
        dy = np.sign(y[sl, None] - y[None, :])
        s += float((dx * dy).sum())
        tx += float((dx == 0).sum())
        ty += float((dy == 0).sum())
    # every pair counted twice, the diagonal n times in each tie count
    pairs = n * (n - 1) / 2
    s /= 2
    n1, n2 = (tx - n) / 2, (ty - n) / 2
    den = math.sqrt((pairs - n1) * (pairs - n2))
    return s / den if den > 0 else float("nan")


def regression_metrics(targets: Sequence[float], preds: Sequence[float]) -> dict[str, float]:
    """``{'srcc', 'kendall', 'mae', 'mape', 'mse', 'n'}``; MAPE is a fraction (|y - p| / max(|y|, eps))."""
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    if len(y) != len(p) or len(y) < 2:
        raise RetiaError(f"metrics: got {len(y)} targets and {len(p)} predictions, expected two equal lengths >= 2")
    err = np.abs(y - p)
    return {"srcc": spearman(y, p), "kendall": kendall_tau(y, p), "mae": float(err.mean()),
            "mape": float((err / np.maximum(np.abs(y), np.finfo(np.float64).eps)).mean()),
            "mse": float((err ** 2).mean()), "n": int(len(y))}


# ---------------------------------------------------------------------------------------------------------------
# target normalisation
# ---------------------------------------------------------------------------------------------------------------
def _gflops(graphs: Sequence[CompGraph]) -> np.ndarray:
    missing = [g.name or str(i) for i, g in enumerate(graphs) if g.flops is None]
    if missing:
        raise RetiaError(f"graph {missing[0]!r} has no FLOPs: build it with profile=True for stand_flops / FLOPs")
    return np.array([g.flops / 1e9 for g in graphs], dtype=np.float64)


class TargetNormalizer:
    """AIO-P's target transforms ``none``, ``stand`` and ``stand_flops`` (see the module docstring)."""

    def __init__(self, kind: str = "stand") -> None:
        if kind not in NORMS:
            raise RetiaError(f"target normalisation {kind!r}: expected one of {', '.join(NORMS)}")
        self.kind = kind
        self.mean, self.std = 0.0, 1.0

    @staticmethod
    def flops_factor(gflops: np.ndarray) -> np.ndarray:
        return np.log10(np.asarray(gflops, dtype=np.float64) + 1) + 1

    def _pre(self, targets: np.ndarray, gflops: np.ndarray | None) -> np.ndarray:
        if self.kind == "stand_flops":
            return targets / self.flops_factor(gflops)
        return targets

    def fit(self, targets: Sequence[float], gflops: Sequence[float] | None = None) -> "TargetNormalizer":
        y = self._pre(np.asarray(targets, dtype=np.float64), None if gflops is None else np.asarray(gflops))
        if self.kind == "none":
            self.mean, self.std = 0.0, 1.0
        else:
            self.mean = float(y.mean())
            self.std = float(y.std()) or 1.0
        return self

    def transform(self, targets: Sequence[float], gflops: Sequence[float] | None = None) -> np.ndarray:
        y = self._pre(np.asarray(targets, dtype=np.float64), None if gflops is None else np.asarray(gflops))
        return (y - self.mean) / self.std

    def inverse(self, values: Sequence[float], gflops: Sequence[float] | None = None) -> np.ndarray:
        y = np.asarray(values, dtype=np.float64) * self.std + self.mean
        if self.kind == "stand_flops":
            y = y * self.flops_factor(gflops)
        return y

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TargetNormalizer":
        n = cls(state["kind"])
        n.mean, n.std = float(state["mean"]), float(state["std"])
        return n


# ---------------------------------------------------------------------------------------------------------------
# graph -> tensors
# ---------------------------------------------------------------------------------------------------------------
_F = {name: i for i, name in enumerate(FEATURES)}
_LOG_COLS = [_F[c] for c in ("h_in", "w_in", "c_in", "h_out", "w_out", "c_out", "stride_h", "stride_w", "groups")]
N_NUMERIC = len(_LOG_COLS) + 6
N_KERNELS = 8  # kernel sizes 0..7 get their own embedding; larger ones share the last row


def graph_tensors(g: CompGraph):
    """A ``torch_geometric.data.Data`` with ``op`` (long), ``num`` (float numeric features), ``kernel`` (long
    [n, 2]), ``bias`` (float one-hot [n, 2]) and ``edge_index``."""
    from torch_geometric.data import Data

    f = g.features.to(torch.float64)
    logs = torch.log2(1 + f[:, _LOG_COLS]) / 10
    # AIO-P's own shape features: resolution / channels relative to the graph's largest
    hw = torch.stack([f[:, _F["h_in"]], f[:, _F["h_out"]], f[:, _F["w_in"]], f[:, _F["w_out"]]], 1)
    ch = torch.stack([f[:, _F["c_in"]], f[:, _F["c_out"]]], 1)
    rel = torch.cat([hw / hw.max().clamp(min=1), ch / ch.max().clamp(min=1)], 1)
    kernel = g.features[:, [_F["kernel_h"], _F["kernel_w"]]].clamp(0, N_KERNELS - 1)
    bias = torch.nn.functional.one_hot(g.features[:, _F["bias"]].clamp(0, 1), 2).float()
    return Data(op=g.op_index, num=torch.cat([logs, rel], 1).float(), kernel=kernel, bias=bias,
                edge_index=g.edge_index.long(), num_nodes=g.num_nodes)


# graph-level inputs of GNNPredictor(graph_features=...): log10(FLOPs + 1), log10(params + 1), log10(nodes)
GLOBAL_FEATURES = ("flops", "params", "nodes")
DEFAULT_GLOBALS = ("flops", "params")  # graph_features=True
N_GLOBAL = len(DEFAULT_GLOBALS)


def _global_names(graph_features: Any) -> tuple[str, ...]:
    """``graph_features`` (False / True / names) as a tuple of :data:`GLOBAL_FEATURES` names."""
    if graph_features is None or graph_features is False:
        return ()
    if graph_features is True:
        return DEFAULT_GLOBALS
    names = (graph_features,) if isinstance(graph_features, str) else tuple(graph_features)
    bad = [n for n in names if n not in GLOBAL_FEATURES]
    if bad or len(set(names)) != len(names):
        raise RetiaError(f"graph_features {graph_features!r}: expected True / False or distinct names from "
                         f"{', '.join(GLOBAL_FEATURES)}")
    return names


def _global_raw(graphs: Sequence[CompGraph], names: Sequence[str] = DEFAULT_GLOBALS) -> np.ndarray:
    needs = [n for n in names if n in ("flops", "params")]
    missing = [g.name or str(i) for i, g in enumerate(graphs) if any(getattr(g, n) is None for n in needs)]
    if missing:
        raise RetiaError(f"graph {missing[0]!r} has no FLOPs / params: build it with profile=True for "
                         "graph_features=True")
    value = {"flops": lambda g: g.flops + 1, "params": lambda g: g.params + 1, "nodes": lambda g: g.num_nodes}
    return np.log10(np.array([[value[n](g) for n in names] for g in graphs], dtype=np.float64))


def _check(graphs: Any, targets: Any | None = None) -> tuple[list[CompGraph], np.ndarray | None]:
    graphs = list(graphs) if isinstance(graphs, (list, tuple)) else graphs
    if not isinstance(graphs, list) or not graphs or not all(isinstance(g, CompGraph) for g in graphs):
        raise RetiaError("predictor: expected a non-empty list of CompGraph (retia.evaluators.aiop.build_graph)")
    if targets is None:
        return graphs, None
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if len(y) != len(graphs):
        raise RetiaError(f"predictor: {len(graphs)} graphs but {len(y)} targets")
    if not np.isfinite(y).all():
        raise RetiaError("predictor: targets contain NaN or inf")
    return graphs, y


# ---------------------------------------------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------------------------------------------
class Predictor:
    """fit / predict / save / load. Subclasses set ``kind`` and implement the four."""

    kind = "predictor"

    def fit(self, graphs: Sequence[CompGraph], targets: Sequence[float]) -> "Predictor":
        raise NotImplementedError

    def predict(self, graphs: Sequence[CompGraph]) -> np.ndarray:
        raise NotImplementedError

    def score(self, graphs: Sequence[CompGraph], targets: Sequence[float]) -> dict[str, float]:
        return regression_metrics(targets, self.predict(graphs))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        from retia.weights import save_weights

        tensors, meta = self._state()
        return save_weights(tensors, _st_path(path), meta={"kind": self.kind, **meta})

    @classmethod
    def load(cls, path: str | Path) -> "Predictor":
        p = load_predictor(path)
        if not isinstance(p, cls):
            raise RetiaError(f"predictor file {str(path)!r} holds a {p.kind} predictor, expected {cls.kind}")
        return p


def _st_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RetiaError(f"predictor path {str(path)!r}: expected a .safetensors file name")
    return path


def load_predictor(path: str | Path) -> Predictor:
    """Any predictor written by ``save``."""
    from retia.weights import load_meta, load_weights

    path = _st_path(path)
    tensors = load_weights(path)
    meta = load_meta(path)
    kinds = {c.kind: c for c in (GNNPredictor, KAdapterPredictor, FlopsPredictor, ParamsPredictor,
                                 GraphStatsPredictor)}
    if not meta or meta.get("kind") not in kinds:
        raise RetiaError(f"predictor file {str(path)!r}: its JSON sidecar names no predictor kind "
                         f"(expected one of {', '.join(kinds)})")
    return kinds[meta["kind"]]._from_state(tensors, meta)


# ---------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------
class _LogLinear(Predictor):
    """target ~ a * log10(x) + b, least squares on the training graphs."""

    attr = ""

    def __init__(self) -> None:
        self.coef = (1.0, 0.0)

    def _x(self, graphs: Sequence[CompGraph]) -> np.ndarray:
        values = [getattr(g, self.attr) for g in graphs]
        if any(v is None for v in values):
            raise RetiaError(f"graph without {self.attr}: build graphs with profile=True for the {self.kind} baseline")
        return np.log10(np.asarray(values, dtype=np.float64) + 1)

    def fit(self, graphs, targets):
        graphs, y = _check(graphs, targets)
        x = self._x(graphs)
        if np.ptp(x) == 0:
            self.coef = (0.0, float(y.mean()))
        else:
            a, b = np.polyfit(x, y, 1)
            self.coef = (float(a), float(b))
        return self

    def predict(self, graphs):
        graphs, _ = _check(graphs)
        return self.coef[0] * self._x(graphs) + self.coef[1]

    def _state(self):
        return {"coef": torch.tensor(self.coef, dtype=torch.float64)}, {}

    @classmethod
    def _from_state(cls, tensors, meta):
        p = cls()
        p.coef = tuple(float(v) for v in tensors["coef"].tolist())
        return p


class FlopsPredictor(_LogLinear):
    kind = "flops"
    attr = "flops"


class ParamsPredictor(_LogLinear):
    kind = "params"
    attr = "params"


class GraphStatsPredictor(Predictor):
    """target ~ linear in log10(FLOPs + 1), log10(params + 1) and log10(node count) -- the GNN's graph-level inputs
    alone -- least squares with an intercept on the training graphs (minimum-norm when they are collinear). The
    ablation that says what the GNN's graph encoder adds over the scalars it is also given."""

    kind = "graph_stats"
    names = ("flops", "params", "nodes")

    def __init__(self) -> None:
        self.coef = np.zeros(len(self.names) + 1)

    def _x(self, graphs: Sequence[CompGraph]) -> np.ndarray:
        return np.c_[_global_raw(graphs, self.names), np.ones(len(graphs))]

    def fit(self, graphs, targets):
        graphs, y = _check(graphs, targets)
        self.coef = np.linalg.lstsq(self._x(graphs), y, rcond=None)[0]
        return self

    def predict(self, graphs):
        graphs, _ = _check(graphs)
        return self._x(graphs) @ self.coef

    def _state(self):
        return {"coef": torch.tensor(self.coef, dtype=torch.float64)}, {"features": list(self.names)}

    @classmethod
    def _from_state(cls, tensors, meta):
        p = cls()
        p.coef = tensors["coef"].double().numpy().copy()
        return p


# ---------------------------------------------------------------------------------------------------------------
# the GNN
# ---------------------------------------------------------------------------------------------------------------
class NodeEmbedding(nn.Module):
    """op embedding ‖ linear(shape features) ‖ kernel-size embeddings ‖ linear(bias one-hot) -> ``width``."""

    def __init__(self, width: int = 32, shape_size: int = 8, kernel_size: int = 8, bias_size: int = 2) -> None:
        super().__init__()
        self.op = nn.Embedding(len(OP_TYPES), width - shape_size - kernel_size - bias_size)
        self.shape = nn.Linear(N_NUMERIC, shape_size)
        self.kernel = nn.Embedding(N_KERNELS, kernel_size // 2)
        self.bias = nn.Linear(2, bias_size)

    def forward(self, data) -> torch.Tensor:
        k = self.kernel(data.kernel).flatten(1)
        return torch.cat([self.op(data.op), self.shape(data.num), k, self.bias(data.bias)], dim=-1)


def _mlp(width: int, inputs: int) -> nn.Sequential:
    # AIO-P's post-projection: linear, linear, relu, linear, linear
    return nn.Sequential(nn.Linear(inputs, width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                         nn.Linear(width, width))


class GNNRegressor(nn.Module):
    """Embedding, ``layers`` GraphConv + tanh, mean pooling, MLP head. With ``n_global`` > 0 (our extension, not in
    AIO-P) the pooled embedding is concatenated with ``n_global`` graph-level inputs (``data.glob``: standardised
    log FLOPs and log params) before the MLP, and a linear map of them is added to the output (a skip path, so
    that a size trend is learnt from a few archs)."""

    def __init__(self, width: int = 32, layers: int = 6, n_global: int = 0) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv

        self.n_global = n_global
        self.embed = NodeEmbedding(width)
        self.gnn = nn.ModuleList(GraphConv(width, width) for _ in range(layers))
        self.post = _mlp(width, width + n_global)
        self.head = nn.Linear(width, 1)
        self.skip = nn.Linear(n_global, 1, bias=False) if n_global else None

    def node_states(self, data) -> list[torch.Tensor]:
        """Node embeddings after the embedding and after every GNN layer."""
        h = [self.embed(data)]
        for layer in self.gnn:
            h.append(torch.tanh(layer(h[-1], data.edge_index)))
        return h

    def forward(self, data) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        z = global_mean_pool(self.node_states(data)[-1], data.batch)
        if not self.n_global:
            return self.head(self.post(z)).squeeze(-1)
        g = data.glob.view(-1, self.n_global)
        return (self.head(self.post(torch.cat([z, g], dim=-1))) + self.skip(g)).squeeze(-1)


class GNNPredictor(Predictor):
    """AIO-P's k-GNN regressor (see the module docstring). Defaults follow the paper's code (width 32, 6
    GraphConv layers, tanh, mean pooling, Adam, batch 32, 40 epochs, MSE) except ``lr``, 1e-3 instead of 1e-4,
    for small families.

    ``graph_features=True`` (our extension; AIO-P's head sees only the pooled node embeddings) also feeds the head
    log10(FLOPs + 1) and log10(params + 1) of each graph, standardised with the mean / s.d. over the graphs given to
    ``fit`` (refitted on the graphs given to ``fine_tune``, as the target normaliser; graphs only, no labels).
    ``graph_features=("flops", "params", "nodes")`` adds log10 of the graph's node count (mean pooling alone cannot
    tell a deep net from a shallow one with the same mix of ops)."""

    kind = "gnn"

    def __init__(self, width: int = 32, layers: int = 6, epochs: int = 40, lr: float = 1e-3, batch_size: int = 32,
                 norm: str = "stand", seed: int = 0, weight_decay: float = 0.0,
                 graph_features: bool | Sequence[str] = False, verbose: bool = False) -> None:
        if width < 16 or width % 2:
            raise RetiaError(f"GNN width {width}: expected an even number >= 16")
        if layers < 1 or epochs < 0 or batch_size < 1 or lr <= 0:
            raise RetiaError(f"GNN settings layers={layers}, epochs={epochs}, batch_size={batch_size}, lr={lr}: "
                             "expected layers >= 1, epochs >= 0, batch_size >= 1, lr > 0")
        names = _global_names(graph_features)
        # True for the default pair (as files written before the names existed), else the list of names
        stored: bool | list[str] = bool(names) if names in ((), DEFAULT_GLOBALS) else list(names)
        self.hparams = dict(width=width, layers=layers, epochs=epochs, lr=lr, batch_size=batch_size, norm=norm,
                            seed=seed, weight_decay=weight_decay, graph_features=stored)
        self.global_names = names
        self.norm = TargetNormalizer(norm)
        self.glob_mean, self.glob_std = [0.0] * len(names), [1.0] * len(names)
        self.verbose = verbose
        self.model: nn.Module | None = None
        self.history: list[float] = []

    # training ---------------------------------------------------------------------------------------------------
    def _new_model(self) -> nn.Module:
        torch.manual_seed(self.hparams["seed"])
        return GNNRegressor(self.hparams["width"], self.hparams["layers"], self._n_global())

    def _n_global(self) -> int:
        return len(self.global_names)

    def _fit_globals(self, graphs: list[CompGraph]) -> None:
        if self._n_global():
            x = _global_raw(graphs, self.global_names)
            self.glob_mean = [float(v) for v in x.mean(0)]
            self.glob_std = [float(v) or 1.0 for v in x.std(0)]

    def _data(self, graphs: list[CompGraph]) -> list:
        data = [graph_tensors(g) for g in graphs]
        if self._n_global():
            x = (_global_raw(graphs, self.global_names) - np.array(self.glob_mean)) / np.array(self.glob_std)
            for d, row in zip(data, x):
                d.glob = torch.tensor(row, dtype=torch.float32).view(1, -1)
        return data

    def _gflops(self, graphs: list[CompGraph]) -> np.ndarray | None:
        return _gflops(graphs) if self.norm.kind == "stand_flops" else None

    def _train(self, graphs: list[CompGraph], y: np.ndarray, params: list[nn.Parameter], epochs: int,
               lr: float, batch_size: int, on_epoch: Callable[[], None] | None = None) -> None:
        from torch_geometric.data import Batch

        data = self._data(graphs)
        target = torch.tensor(self.norm.transform(y, self._gflops(graphs)), dtype=torch.float32)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=self.hparams["weight_decay"])
        rng = random.Random(self.hparams["seed"])
        order = list(range(len(data)))
        self.model.train()
        for epoch in range(epochs):
            rng.shuffle(order)
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = Batch.from_data_list([data[i] for i in idx])
                loss = nn.functional.mse_loss(self.model(batch), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            self.history.append(total / len(order))
            if self.verbose:
                print(f"epoch {epoch + 1}/{epochs}: loss {self.history[-1]:.4f}")
            if on_epoch is not None:
                on_epoch()
                self.model.train()
        self.model.eval()

    def fit(self, graphs, targets):
        graphs, y = _check(graphs, targets)
        self.norm.fit(y, self._gflops(graphs))
        self._fit_globals(graphs)
        self.model = self._new_model()
        self.history = []
        hp = self.hparams
        self._train(graphs, y, list(self.model.parameters()), hp["epochs"], hp["lr"], hp["batch_size"])
        return self

    def fine_tune(self, graphs, targets, epochs: int = 100, lr: float | None = None,
                  batch_size: int = 1, val_fraction: float = 0.0) -> "GNNPredictor":
        """A copy trained ``epochs`` more on ``graphs`` (e.g. 20 architectures of a target family), all weights
        trainable, its normaliser refitted on these targets (AIO-P's fine-tuning; batch size 1 as there).

        ``val_fraction`` > 0 (our addition): early stopping inside the fine-tuning set -- a copy is fine-tuned on
        the rest of ``graphs`` for ``epochs`` while the MSE on the held-back ``val_fraction`` of them is tracked
        each epoch; then the returned copy is fine-tuned on all ``graphs`` for the best epoch count. Only these
        graphs and targets are seen (``ft.finetune_epochs`` records the count chosen)."""
        self._need_model()
        graphs, y = _check(graphs, targets)
        lr = lr or self.hparams["lr"]
        if val_fraction > 0:
            n_val = int(round(len(graphs) * val_fraction))
            if not 1 <= n_val <= len(graphs) - 2:
                raise RetiaError(f"val_fraction {val_fraction} of {len(graphs)} fine-tuning graphs: expected at "
                                 "least 1 for validation and 2 for training")
            order = np.random.RandomState(self.hparams["seed"]).permutation(len(graphs))
            val, tr = order[:n_val], order[n_val:]
            probe = copy.deepcopy(self)
            g_tr = [graphs[i] for i in tr]
            probe.norm.fit(y[tr], probe._gflops(g_tr))
            probe._fit_globals(g_tr)
            g_val = [graphs[i] for i in val]
            losses = []
            probe._train(g_tr, y[tr], probe._ft_params(), epochs, lr, batch_size,
                         on_epoch=lambda: losses.append(float(np.mean((probe.predict(g_val) - y[val]) ** 2))))
            epochs = int(np.argmin(losses)) + 1
        ft = copy.deepcopy(self)
        ft.finetune_epochs = epochs
        ft.norm.fit(y, ft._gflops(graphs))
        ft._fit_globals(graphs)
        ft._train(graphs, y, ft._ft_params(), epochs, lr, batch_size)
        return ft

    def _ft_params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def _need_model(self) -> None:
        if self.model is None:
            raise RetiaError(f"{self.kind} predictor is not trained: call fit() or load() first")

    @torch.no_grad()
    def predict(self, graphs):
        from torch_geometric.data import Batch

        self._need_model()
        graphs, _ = _check(graphs)
        self.model.eval()
        out = []
        for start in range(0, len(graphs), 256):
            chunk = graphs[start:start + 256]
            out.append(self.model(Batch.from_data_list(self._data(chunk))).double().numpy())
        return self.norm.inverse(np.concatenate(out), self._gflops(graphs))

    # files ------------------------------------------------------------------------------------------------------
    def _state(self):
        self._need_model()
        return self.model.state_dict(), {"hparams": self.hparams, "normalizer": self.norm.state(),
                                         "graph_features": {"mean": self.glob_mean, "std": self.glob_std},
                                         "op_types": list(OP_TYPES), "features": list(FEATURES)}

    def _load_globals(self, meta: dict) -> None:
        gf = meta.get("graph_features") or {}
        self.glob_mean = [float(v) for v in gf.get("mean", self.glob_mean)]
        self.glob_std = [float(v) for v in gf.get("std", self.glob_std)]

    @classmethod
    def _from_state(cls, tensors, meta):
        p = cls(**meta["hparams"])
        p.norm = TargetNormalizer.from_state(meta["normalizer"])
        p._load_globals(meta)
        p.model = p._new_model()
        p.model.load_state_dict(tensors)
        p.model.eval()
        return p


class KAdapterModel(nn.Module):
    """A frozen :class:`GNNRegressor` with parallel adapter GNN layers and a new head (AIO-P's K-adapter, K=1)."""

    def __init__(self, base: GNNRegressor) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv

        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        width = base.head.in_features
        self.adapters = nn.ModuleList(GraphConv(2 * width, width) for _ in base.gnn)
        self.head = nn.Sequential(*_mlp(width, 2 * width), nn.Linear(width, 1))

    def forward(self, data) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        h = self.base.node_states(data)
        a = h[0]
        for i, layer in enumerate(self.adapters):
            a = torch.tanh(layer(torch.cat([h[i + 1], a], dim=-1), data.edge_index))
        z = torch.cat([global_mean_pool(h[-1], data.batch), global_mean_pool(a, data.batch)], dim=-1)
        return self.head(z).squeeze(-1)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) + list(self.head.parameters())


class KAdapterPredictor(GNNPredictor):
    """``KAdapterPredictor(base).fit(graphs_k, targets_k)``: trains only the adapters and the new head on another
    family's labels (the base GNN stays frozen). ``fine_tune`` then trains the head and the base GNN layers, the
    adapters frozen (AIO-P's ``-k_adapt 1``)."""

    kind = "kadapter"

    def __init__(self, base: GNNPredictor | None = None, epochs: int | None = None, lr: float | None = None,
                 norm: str | None = None, **hparams: Any) -> None:
        if base is not None:
            base._need_model()
            hp = {**base.hparams, **hparams}
        else:
            hp = dict(hparams)
        if epochs is not None:
            hp["epochs"] = epochs
        if lr is not None:
            hp["lr"] = lr
        if norm is not None:
            hp["norm"] = norm
        super().__init__(**hp)
        self.model = KAdapterModel(copy.deepcopy(base.model)) if base is not None else None
        if base is not None:
            self.glob_mean, self.glob_std = list(base.glob_mean), list(base.glob_std)

    def fit(self, graphs, targets):
        self._need_model()
        graphs, y = _check(graphs, targets)
        self.norm.fit(y, self._gflops(graphs))
        self.history = []
        for p in self.model.base.parameters():
            p.requires_grad_(False)
        for p in self.model.adapter_parameters():
            p.requires_grad_(True)
        hp = self.hparams
        self._train(graphs, y, self.model.adapter_parameters(), hp["epochs"], hp["lr"], hp["batch_size"])
        return self

    def _ft_params(self) -> list[nn.Parameter]:
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = list(self.model.head.parameters()) + list(self.model.base.gnn.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    @classmethod
    def _from_state(cls, tensors, meta):
        p = cls(**meta["hparams"])
        p.norm = TargetNormalizer.from_state(meta["normalizer"])
        p._load_globals(meta)
        torch.manual_seed(0)
        p.model = KAdapterModel(GNNRegressor(p.hparams["width"], p.hparams["layers"], p._n_global()))
        p.model.load_state_dict(tensors)
        p.model.eval()
        return p


# ---------------------------------------------------------------------------------------------------------------
# protocol helpers
# ---------------------------------------------------------------------------------------------------------------
def split_family(items: Sequence[Any], n_finetune: int, seed: int = 0,
                 key: Callable[[Any], str] | None = None) -> tuple[list[int], list[int]]:
    """AIO-P's ``family#N`` split: sort by name, shuffle with ``seed``, the last ``n_finetune`` are for fine-tuning
    (and normalisation statistics), the rest for testing. Returns (fine-tune indices, test indices)."""
    n = len(items)
    if not 0 <= n_finetune < n:
        raise RetiaError(f"fine-tune size {n_finetune}: expected 0 <= N < {n} (the family's size)")
    key = key or (lambda g: getattr(g, "name", ""))
    order = sorted(range(n), key=lambda i: (key(items[i]), i))
    np.random.RandomState(seed).shuffle(order)
    cut = n - n_finetune
    return order[cut:], order[:cut]


def evaluate_seeds(make: Callable[[int], Predictor], train: tuple[Sequence[CompGraph], Sequence[float]],
                   test: tuple[Sequence[CompGraph], Sequence[float]], seeds: Sequence[int] = (0, 1, 2, 3, 4),
                   finetune: tuple[Sequence[CompGraph], Sequence[float]] | None = None,
                   finetune_epochs: int = 100) -> dict[str, Any]:
    """Fit ``make(seed)`` on ``train`` for each seed (optionally fine-tune on ``finetune``), score on ``test``:
    ``{'per_seed': [metrics...], 'mean': {...}, 'std': {...}}``."""
    runs = []
    for seed in seeds:
        p = make(seed).fit(*train)
        if finetune is not None and isinstance(p, GNNPredictor):
            p = p.fine_tune(*finetune, epochs=finetune_epochs)
        runs.append({"seed": seed, **p.score(*test)})
    keys = [k for k in runs[0] if k not in ("seed", "n")]
    return {"per_seed": runs, "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
            "std": {k: float(np.std([r[k] for r in runs])) for k in keys}}
