"""AIO-P (Mills et al., AAAI-23): computational graphs of any PyTorch model and GNN performance predictors.

- :mod:`.graph`: ``build_graph(model, input_shape) -> CompGraph``, ``save_graphs`` / ``load_graphs``
  (safetensors + JSON), ``render``; ``python -m retia.evaluators.aiop.graph render --model resnet18 -o g.png``.
- :mod:`.predictor`: ``GNNPredictor`` (k-GNN regressor), ``KAdapterPredictor``, ``FlopsPredictor``,
  ``ParamsPredictor``, ``GraphStatsPredictor`` (a line on log FLOPs, log params, log node count),
  ``TargetNormalizer`` (``stand`` / ``stand_flops``), ``regression_metrics``,
  ``load_predictor``.
- :mod:`.family`: labelled families trained on a task (``build_family``, ``load_family``, ``noise_ceiling``;
  ``python -m retia.evaluators.aiop.family --space autoformer|zennas|hrnas-seg|hrnas-kp --n 40 -o family.safetensors``).
- :mod:`.shared_head`: AIO-P's shared-head shortcut for cheap labels (``label_family_shared_head``,
  ``rank_agreement``).
- :mod:`.search`: ``PredictorEvaluator`` (an NNI evaluator reporting predictions), ``guided_search``.

See docs/aiop.md.
"""
from .graph import FEATURES, OP_TYPES, CompGraph, build_graph, load_graph, load_graphs, save_graph, save_graphs

__all__ = ["FEATURES", "OP_TYPES", "CompGraph", "build_graph", "load_graph", "load_graphs", "save_graph",
           "save_graphs"]
