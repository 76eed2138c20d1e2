"""AIO-P predictors: metrics vs scipy, target normalisation without leakage, learning a synthetic target,
fine-tuning, the K-adapter, baselines, save/load."""
import random

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from retia.errors import RetiaError
from retia.evaluators.aiop.graph import build_graph
from retia.evaluators.aiop.predictor import (FlopsPredictor, GNNPredictor, GraphStatsPredictor, KAdapterPredictor,
                                             ParamsPredictor, TargetNormalizer, evaluate_seeds, kendall_tau,
                                             load_predictor, regression_metrics, spearman, split_family)


def _random_cnn(rng: random.Random) -> nn.Module:
    layers, c = [], 3
    for _ in range(rng.randint(1, 5)):
        out, k, s = rng.choice([8, 16, 32, 64]), rng.choice([1, 3, 5]), rng.choice([1, 1, 2])
        layers += [nn.Conv2d(c, out, k, s, k // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.fixture(scope="module")
def family():
    """120 random CNN graphs; target = 0.5 * (#3x3 convs) + log2(widest conv) -- a function of graph features."""
    rng = random.Random(0)
    graphs, ys = [], []
    for i in range(120):
        g = build_graph(_random_cnn(rng), (1, 3, 16, 16), name=f"cnn{i:03d}")
        convs = g.nodes_of("conv")
        ys.append(0.5 * sum(g.feature(j, "kernel_h") == 3 for j in convs)
                  + np.log2(max(g.feature(j, "c_out") for j in convs)))
        graphs.append(g)
    return graphs, np.array(ys)


def test_metrics_match_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 60).astype(float)  # ties on both sides
    p = y + rng.integers(-3, 4, 60)
    m = regression_metrics(y + 1, p + 1)
    assert m["srcc"] == pytest.approx(stats.spearmanr(y, p)[0], abs=1e-12)
    assert m["kendall"] == pytest.approx(stats.kendalltau(y, p)[0], abs=1e-12)
    assert spearman(y, p) == pytest.approx(stats.spearmanr(y, p)[0], abs=1e-12)
    assert kendall_tau(y, -p) == pytest.approx(stats.kendalltau(y, -p)[0], abs=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - p)))
    assert m["mape"] == pytest.approx(np.mean(np.abs(y - p) / (y + 1)))
    assert regression_metrics([1, 2, 3], [3, 2, 1])["srcc"] == -1.0
    with pytest.raises(RetiaError, match="3 targets and 2 predictions"):
        regression_metrics([1, 2, 3], [1, 2])


def test_stand_flops_formula_and_inverse():
    y, gflops = np.array([0.7, 0.8, 0.9]), np.array([0.5, 1.0, 4.0])
    n = TargetNormalizer("stand_flops").fit(y, gflops)
    q = y / (np.log10(gflops + 1) + 1)
    assert n.mean == pytest.approx(q.mean()) and n.std == pytest.approx(q.std())
    z = n.transform(y, gflops)
    assert z == pytest.approx((q - q.mean()) / q.std())
    assert n.inverse(z, gflops) == pytest.approx(y)
    with pytest.raises(RetiaError, match="expected one of none, stand, stand_flops"):
        TargetNormalizer("minmax")


@pytest.mark.parametrize("norm", ["stand", "stand_flops"])
def test_normalisation_statistics_come_from_the_training_split_only(family, norm):
    graphs, y = family
    ft_idx, test_idx = split_family(graphs, 20, seed=1)
    assert not set(ft_idx) & set(test_idx) and len(ft_idx) == 20 and len(ft_idx) + len(test_idx) == len(graphs)
    train = [graphs[i] for i in test_idx[:60]]
    p = GNNPredictor(epochs=1, layers=2, norm=norm).fit(train, y[test_idx[:60]])
    expected = TargetNormalizer(norm).fit(y[test_idx[:60]], [g.flops / 1e9 for g in train])
    assert (p.norm.mean, p.norm.std) == (expected.mean, expected.std)
    before = p.norm.state()
    p.predict(graphs)  # predicting never touches the statistics
    assert p.norm.state() == before
    ft = p.fine_tune([graphs[i] for i in ft_idx], y[ft_idx], epochs=1)
    assert ft.norm.mean == pytest.approx(TargetNormalizer(norm).fit(y[ft_idx], [graphs[i].flops / 1e9 for i in
                                                                                 ft_idx]).mean)
    assert p.norm.state() == before  # fine-tuning works on a copy


def test_gnn_learns_a_synthetic_target(family):
    graphs, y = family
    p = GNNPredictor(epochs=40, lr=3e-3, batch_size=16, seed=0).fit(graphs[:90], y[:90])
    m = p.score(graphs[90:], y[90:])
    assert m["srcc"] > 0.8, m
    assert p.history[-1] < p.history[0] / 3
    untrained = GNNPredictor(epochs=0, seed=0).fit(graphs[:90], y[:90]).score(graphs[90:], y[90:])
    assert m["mae"] < untrained["mae"]


def test_several_seeds_and_fine_tuning(family):
    graphs, y = family
    out = evaluate_seeds(lambda s: GNNPredictor(epochs=2, layers=2, seed=s), (graphs[:60], y[:60]),
                         (graphs[80:], y[80:]), seeds=(0, 1), finetune=(graphs[60:80], y[60:80]), finetune_epochs=1)
    assert [r["seed"] for r in out["per_seed"]] == [0, 1]
    assert out["per_seed"][0]["srcc"] != out["per_seed"][1]["srcc"]
    assert set(out["mean"]) == {"srcc", "kendall", "mae", "mape", "mse"}


def test_k_adapter_trains_only_adapter_parameters(family):
    graphs, y = family
    base = GNNPredictor(epochs=2, layers=3).fit(graphs[:40], y[:40])
    base_state = {k: v.clone() for k, v in base.model.state_dict().items()}
    k = KAdapterPredictor(base, epochs=3)
    adapter_before = {n: p.detach().clone() for n, p in k.model.named_parameters() if not n.startswith("base.")}
    k.fit(graphs[40:80], -y[40:80])  # another "family": opposite labels
    for name, p in k.model.named_parameters():
        if name.startswith("base."):
            assert torch.equal(p, base_state[name[len("base."):]]) and not p.requires_grad, name
        else:
            assert not torch.equal(p, adapter_before[name]), name
    assert all(torch.equal(v, base.model.state_dict()[n]) for n, v in base_state.items())  # base untouched
    assert k.norm.mean == pytest.approx(-y[40:80].mean())
    # fine-tuning (AIO-P's k_adapt=1): head and base GNN layers train, the adapters stay
    adapters = {n: p.detach().clone() for n, p in k.model.adapters.named_parameters()}
    gnn = {n: p.detach().clone() for n, p in k.model.base.gnn.named_parameters()}
    ft = k.fine_tune(graphs[80:90], y[80:90], epochs=2)
    assert all(torch.equal(p, adapters[n]) for n, p in ft.model.adapters.named_parameters())
    assert any(not torch.equal(p, gnn[n]) for n, p in ft.model.base.gnn.named_parameters())


def test_save_load_every_predictor(family, tmp_path):
    graphs, y = family
    base = GNNPredictor(epochs=2, layers=2, norm="stand_flops").fit(graphs[:40], y[:40])
    preds = [base, KAdapterPredictor(base, epochs=1).fit(graphs[40:60], y[40:60]),
             FlopsPredictor().fit(graphs[:40], y[:40]), ParamsPredictor().fit(graphs[:40], y[:40]),
             GraphStatsPredictor().fit(graphs[:40], y[:40])]
    for p in preds:
        path = p.save(tmp_path / f"{p.kind}.safetensors")
        q = load_predictor(path)
        assert type(q) is type(p)
        assert np.array_equal(q.predict(graphs[60:]), p.predict(graphs[60:]))
    assert isinstance(GNNPredictor.load(tmp_path / "gnn.safetensors"), GNNPredictor)
    with pytest.raises(RetiaError, match="holds a flops predictor, expected gnn"):
        GNNPredictor.load(tmp_path / "flops.safetensors")


def test_flops_baseline_ranks_by_flops(family):
    graphs, _ = family
    y = np.log10([g.flops + 1 for g in graphs]) * 2 + 1  # the baseline fits a line on log10(FLOPs + 1)
    m = FlopsPredictor().fit(graphs[:50], y[:50]).score(graphs[50:], y[50:])
    assert m["srcc"] == pytest.approx(1.0) and m["mae"] < 1e-9


def test_graph_stats_baseline_is_least_squares_on_the_three_logs(family):
    graphs, _ = family
    x = np.array([[np.log10(g.flops + 1), np.log10(g.params + 1), np.log10(g.num_nodes)] for g in graphs])
    y = x @ np.array([2.0, -1.5, 3.0]) + 0.5  # exactly linear in the three: recovered, ranked perfectly
    p = GraphStatsPredictor().fit(graphs[:50], y[:50])
    assert p.coef == pytest.approx([2.0, -1.5, 3.0, 0.5], abs=1e-6)
    m = p.score(graphs[50:], y[50:])
    assert m["srcc"] == pytest.approx(1.0) and m["mae"] < 1e-6
    # on any target its predictions are numpy's least-squares fit with an intercept, by hand
    rng = np.random.default_rng(0)
    z = rng.normal(size=len(graphs))
    design = np.c_[x[:50], np.ones(50)]
    coef = np.linalg.lstsq(design, z[:50], rcond=None)[0]
    assert GraphStatsPredictor().fit(graphs[:50], z[:50]).predict(graphs[50:]) == pytest.approx(
        np.c_[x[50:], np.ones(len(graphs) - 50)] @ coef)
    assert FlopsPredictor().fit(graphs[:50], y[:50]).score(graphs[50:], y[50:])["srcc"] < 0.999  # FLOPs alone miss it


def test_bad_input_is_one_line(family):
    graphs, y = family
    for call, pattern in [(lambda: GNNPredictor().fit(graphs[:3], y[:2]), "3 graphs but 2 targets"),
                          (lambda: GNNPredictor().predict(graphs[:3]), "not trained"),
                          (lambda: GNNPredictor().fit([], []), "non-empty list of CompGraph"),
                          (lambda: GNNPredictor(norm="log"), "target normalisation 'log'"),
                          (lambda: GNNPredictor(width=7), "GNN width 7"),
                          (lambda: split_family(graphs, 200), "fine-tune size 200"),
                          (lambda: load_predictor("nope.pt"), "expected a .safetensors")]:
        with pytest.raises(RetiaError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


def test_graph_level_features_learn_a_flops_target_and_round_trip(family, tmp_path):
    """graph_features=True (our extension): the head sees standardised log FLOPs / log params; a target made of
    them (not monotone in FLOPs alone) is learnt, statistics come from the fitted graphs only, save/load keeps it."""
    graphs, _ = family
    lf = np.log10([g.flops + 1 for g in graphs])
    lp = np.log10([g.params + 1 for g in graphs])
    y = 2 * lf - 1.5 * lp
    p = GNNPredictor(epochs=40, layers=2, lr=3e-3, batch_size=16, seed=0, graph_features=True).fit(graphs[:90], y[:90])
    m = p.score(graphs[90:], y[90:])
    assert m["srcc"] > 0.9, m
    flops_only = FlopsPredictor().fit(graphs[:90], y[:90]).score(graphs[90:], y[90:])
    assert m["srcc"] > flops_only["srcc"] + 0.1, (m, flops_only)
    assert p.glob_mean == pytest.approx([lf[:90].mean(), lp[:90].mean()])  # training graphs only
    assert p.glob_std == pytest.approx([lf[:90].std(), lp[:90].std()])
    assert p.model.skip is not None and p.model.post[0].in_features == 32 + 2
    ft = p.fine_tune(graphs[90:110], y[90:110], epochs=2, batch_size=4)
    assert ft.glob_mean == pytest.approx([lf[90:110].mean(), lp[90:110].mean()])
    assert p.glob_mean == pytest.approx([lf[:90].mean(), lp[:90].mean()])  # fine-tuning works on a copy
    for q in (p, ft, KAdapterPredictor(p, epochs=1).fit(graphs[:20], y[:20])):
        path = q.save(tmp_path / f"{q.kind}.safetensors")
        r = load_predictor(path)
        assert r.hparams["graph_features"] is True and r.glob_mean == q.glob_mean and r.glob_std == q.glob_std
        assert np.array_equal(r.predict(graphs[100:]), q.predict(graphs[100:]))
    plain = GNNPredictor(epochs=1, layers=2).fit(graphs[:20], y[:20])
    assert plain.model.skip is None and plain.model.post[0].in_features == 32


def test_fine_tune_early_stopping_inside_the_fine_tuning_set(family):
    graphs, y = family
    p = GNNPredictor(epochs=2, layers=2, seed=0, graph_features=True).fit(graphs[:60], y[:60])
    ft = p.fine_tune(graphs[60:80], y[60:80], epochs=6, batch_size=4, val_fraction=0.25)
    assert 1 <= ft.finetune_epochs <= 6
    assert ft.norm.mean == pytest.approx(y[60:80].mean())  # the returned copy is tuned on all 20
    with pytest.raises(RetiaError, match="val_fraction 0.99 of 20"):
        p.fine_tune(graphs[60:80], y[60:80], epochs=2, val_fraction=0.99)


def test_node_count_graph_feature(family, tmp_path):
    """graph_features=("flops", "params", "nodes"): a target made only of the node count (which mean pooling cannot
    see) is learnt; the statistics include log10(nodes) of the fitted graphs; the names survive save/load."""
    graphs, _ = family
    ln = np.log10([g.num_nodes for g in graphs])
    y = 3 * ln
    p = GNNPredictor(epochs=30, layers=2, lr=3e-3, batch_size=16, seed=0,
                     graph_features=("flops", "params", "nodes")).fit(graphs[:90], y[:90])
    assert p.score(graphs[90:], y[90:])["srcc"] > 0.9
    assert p.glob_mean[2] == pytest.approx(ln[:90].mean()) and p.glob_std[2] == pytest.approx(ln[:90].std())
    assert p.model.post[0].in_features == 32 + 3
    r = load_predictor(p.save(tmp_path / "n.safetensors"))
    assert r.hparams["graph_features"] == ["flops", "params", "nodes"]
    assert np.array_equal(r.predict(graphs[100:]), p.predict(graphs[100:]))
    assert GNNPredictor(graph_features=True).global_names == ("flops", "params")
    with pytest.raises(RetiaError, match="graph_features \\['depth'\\]: expected") as info:
        GNNPredictor(graph_features=["depth"])
    assert "\n" not in str(info.value)
