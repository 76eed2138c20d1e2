"""Graph-building speed for AIO-P (target: < 20 ms per ~100-node architecture on one CPU thread).

    python benchmarks/aiop_graph.py [--repeats 5] [--zennas 10]

Prints, per model, its node count and the median milliseconds of ``build_graph`` with each tracer, without and
with FLOPs/params profiling (one meta-device pass either way), and ms per 100 nodes.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zennas", type=int, default=10, help="random Zen-NAS structures of ~100 nodes to add")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import random

    from retia.errors import RetiaError
    from retia.evaluators.aiop.graph import build_graph, named_model
    from retia.spaces import zennas

    models = [(n, *named_model(n)) for n in ("resnet18", "autoformer-micro", "zennet_cifar10_model_size05M_res32",
                                              "mobilenet_v3_small")]
    rng = random.Random(0)
    while sum(n.startswith("zennas") for n, _, _ in models) < args.zennas:
        s = zennas.random_structure(rng)
        m = zennas.build(s, num_classes=10)
        if 80 <= build_graph(m, (1, 3, 32, 32), profile=False).num_nodes <= 130:
            models.append((f"zennas#{len(models) - 3}", m, (1, 3, 32, 32)))

    def timed(model, shape, method, profile):
        build_graph(model, shape, method=method, profile=profile)  # warm-up
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            g = build_graph(model, shape, method=method, profile=profile)
            ts.append(time.perf_counter() - t)
        return g, 1000 * statistics.median(ts)

    print(f"{'model':38s} {'nodes':>5s} {'via':>12s} {'auto ms':>8s} {'fx ms':>8s} {'hooks ms':>8s} "
          f"{'+prof ms':>8s} {'ms/100n':>8s}")
    per100 = []
    for name, model, shape in models:
        g, auto = timed(model, shape, "auto", False)
        try:
            fx = timed(model, shape, "fx", False)[1]
        except RetiaError:  # fx cannot trace it (AutoFormer)
            fx = float("nan")
        _, hooks = timed(model, shape, "hooks", False)
        _, prof = timed(model, shape, "auto", True)
        per100.append(100 * auto / g.num_nodes)
        print(f"{name:38s} {g.num_nodes:5d} {g.method:>12s} {auto:8.1f} {fx:8.1f} {hooks:8.1f} {prof:8.1f} "
              f"{per100[-1]:8.1f}")
    print(f"median ms per 100 nodes (auto, no profiling): {statistics.median(per100):.1f}")


if __name__ == "__main__":
    main()
