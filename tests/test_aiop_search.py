"""AIO-P predictor as an NNI evaluator, predictor-guided search, and experiments/aiop_predictor.py."""
import dataclasses
import json

import nni
import numpy as np
import pytest
import torch

from retia.errors import RetiaError
from retia.evaluators.aiop.family import arch_graph, sample_archs
from retia.evaluators.aiop.predictor import FlopsPredictor, GNNPredictor
from retia.evaluators.aiop.search import PoolSpace, PredictorEvaluator, guided_search, true_rank

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pool():
    """12 Zen-NAS family graphs (untrained) and a synthetic target exactly linear in log10(FLOPs)."""
    structures = sample_archs("zennas", 12, seed=7)
    graphs = [arch_graph("zennas", s, f"z{i}") for i, s in enumerate(structures)]
    labels = np.array([3.0 * np.log10(g.flops + 1) + 1.0 for g in graphs])
    return structures, graphs, labels


@pytest.fixture
def reported(monkeypatch):
    values, original = [], nni.report_final_result

    def report(value):
        values.append(value)
        original(value)

    monkeypatch.setattr(nni, "report_final_result", report)
    return values


def test_evaluator_reports_the_prediction_of_an_arch(pool, reported, tmp_path):
    structures, graphs, labels = pool
    gnn = GNNPredictor(epochs=2, seed=0).fit(graphs, labels)
    gnn.save(tmp_path / "p.safetensors")
    s = structures[3]
    expected = float(gnn.predict([arch_graph("zennas", s, "x")])[0])
    by_space = PredictorEvaluator(tmp_path / "p.safetensors", space="zennas")  # loaded from its file
    assert by_space.evaluate(s) == pytest.approx(expected, rel=1e-6)
    assert by_space.evaluate({"structure": s}) == pytest.approx(expected, rel=1e-6)  # an NNI sample
    from retia.spaces import zennas

    by_module = PredictorEvaluator(gnn, input_shape=(1, 3, 16, 16))
    assert by_module.evaluate(zennas.build(s, num_classes=10)) == pytest.approx(expected, rel=1e-6)
    by_pool = PredictorEvaluator(gnn, pool=graphs)
    assert by_pool.evaluate({"index": 3}) == pytest.approx(expected, rel=1e-6)
    assert reported == pytest.approx([expected] * 4, rel=1e-6)
    assert reported[0] != pytest.approx(float(gnn.predict([graphs[0]])[0]))  # it is this arch's prediction


def test_evaluator_drives_evolution_on_the_autoformer_space(reported, tmp_path):
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import RawModelFormatConfig, SequentialEngineConfig

    from retia.spaces.autoformer import AutoformerSpace
    from retia.strategies import ConstrainedEvolution

    archs = sample_archs("autoformer", 4)
    graphs = [arch_graph("autoformer", a, str(i)) for i, a in enumerate(archs)]
    p = FlopsPredictor().fit(graphs, [1.0, 2.0, 3.0, 4.5])
    evaluator = PredictorEvaluator(p, input_shape=(1, 3, 32, 32))
    exp = NasExperiment(AutoformerSpace.from_preset("micro"), evaluator,
                        ConstrainedEvolution(population_size=2, sample_size=1, seed=0))
    exp.config.max_trial_number = 3
    exp.config.execution_engine = SequentialEngineConfig()
    exp.config.model_format = RawModelFormatConfig()
    exp.config.experiment_working_directory = str(tmp_path)
    exp.run()
    exp.stop()
    assert len(evaluator.history) == 3 and reported == [v for _, v in evaluator.history]
    for sample, value in evaluator.history:  # the prediction for exactly the subnet NNI proposed
        arch = AutoformerSpace.from_preset("micro").complete_arch(sample)
        assert value == pytest.approx(float(p.predict([arch_graph("autoformer", arch, "a")])[0]))


def test_guided_search_finds_the_true_best_on_a_known_target(pool):
    _, graphs, labels = pool
    exact = FlopsPredictor().fit(graphs, labels)  # the target is a line in log10(FLOPs): predictions are exact
    assert np.allclose(exact.predict(graphs), labels)
    full = guided_search(exact, graphs, labels, strategy="random", trials=len(graphs))
    assert full["distinct"] == len(graphs) and full["found"]["rank"] == 1 and full["gap"] == 0.0
    assert full["found"]["index"] == int(np.argmax(labels))
    evo = guided_search(exact, graphs, labels, strategy="evolution", trials=6, seed=1)
    assert evo["trials"] == 6 and evo["found"]["rank"] == evo["best_seen_rank"]
    assert evo["gap"] == pytest.approx(labels.max() - labels[evo["found"]["index"]])
    worst = FlopsPredictor().fit(graphs, -labels)  # a predictor ranking backwards picks the true worst
    assert guided_search(worst, graphs, labels, strategy="random", trials=len(graphs))["found"]["rank"] == len(graphs)


def test_true_rank_and_bad_input():
    assert [true_rank([3.0, 1.0, 3.0, 2.0], i) for i in range(4)] == [1, 4, 1, 3]
    p = FlopsPredictor()
    cases = [
        (lambda: PredictorEvaluator(p), "give space=, pool= or input_shape="),
        (lambda: PredictorEvaluator(p, space="nasbench"), "family space 'nasbench'"),
        (lambda: PredictorEvaluator("p.pt", space="zennas"), "expected a .safetensors"),
        (lambda: PoolSpace(1), "pool size 1"),
    ]
    for fn, message in cases:
        with pytest.raises(RetiaError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


def test_bad_pool_input(pool):
    _, graphs, labels = pool
    p = FlopsPredictor().fit(graphs, labels)
    with pytest.raises(RetiaError, match="expected an index 0..11"):
        PredictorEvaluator(p, pool=graphs).predict({"index": 12})
    with pytest.raises(RetiaError, match="trials 13: expected 1..12"):
        guided_search(p, graphs, labels, trials=13)
    with pytest.raises(RetiaError, match="strategy 'grid'"):
        guided_search(p, graphs, labels, strategy="grid")


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path, capsys):
    from retia.evaluators.aiop.family import SPACES, default_family_file
    from retia.experiments.aiop_predictor import main

    out = tmp_path / "run"
    args = ["--downstream", "--n", "5", "--epochs", "1", "--finetune", "3", "--seeds", "0", "1",
            "--predictor-epochs", "3", "--finetune-epochs", "2", "--noise-ceiling", "2", "--output", str(out),
            "--no-progress"]
    summary = main(args)
    text = capsys.readouterr().out
    assert "autoformer" in text and "zennas" in text and "hrnas-seg" in text and "SRCC" in text
    assert "label-noise ceiling" in text
    seg_file = default_family_file(out / "families", "hrnas-seg",
                                   dataclasses.replace(SPACES["hrnas-seg"].settings, epochs=1))
    assert seg_file.name == "hrnas-seg-e1-s0.safetensors"
    for name in ("results.json", "results.csv", "predictions.csv", "scatter.png", "run.json",
                 "families/autoformer-e1-s0.safetensors", "families/zennas-e1-s0.safetensors",
                 "families/hrnas-seg-e1-s0.safetensors", "families/hrnas-seg-e1-s0.noise-o1000.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    results = saved["results"]
    assert [r["target"] for r in results] == ["autoformer", "zennas", "hrnas-seg"]
    # classification targets are predicted from the other classification family, the downstream family from both
    expected_sources = {"autoformer": ["zennas"], "zennas": ["autoformer"], "hrnas-seg": ["autoformer", "zennas"]}
    for r in results:
        assert r["sources"] == expected_sources[r["target"]] and r["test"] == 2
        assert r["metric"] == ("miou" if r["target"] == "hrnas-seg" else "top1")
        assert set(r["metrics"]) == {"gnn", "gnn_zero_shot", "flops", "params", "graph_stats"}
        assert r["metrics"]["gnn"]["seeds"] == 2 and len(r["per_seed"]["gnn"]) == 2
        assert r["search"]["gnn"]["found"]["rank"] in (1, 2)
    assert saved["families"]["hrnas-seg"]["metric"] == "miou" and 0 <= saved["families"]["hrnas-seg"]["max"] <= 1
    assert set(saved["noise_ceiling"]) == {"autoformer", "zennas", "hrnas-seg"}
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 3 * 5
    # reusing the families trains nothing and gives the same families
    reuse = ["--family-file", f"autoformer={out}/families/autoformer-e1-s0.safetensors", "--family-file",
             f"zennas={out}/families/zennas-e1-s0.safetensors", "--family-file", f"hrnas-seg={seg_file}"]
    again = main(args[:-5] + ["--output", str(tmp_path / "again"), "--no-progress"] + reuse)
    for space in ("zennas", "hrnas-seg"):
        assert again["families"][space]["mean"] == summary["families"][space]["mean"]
    assert not (tmp_path / "again" / "families").exists()


def test_experiment_bad_flags_are_one_line(tmp_path):
    from retia.experiments.aiop_predictor import main

    with pytest.raises(RetiaError, match="--families 'resnet'"):
        main(["--families", "resnet", "--output", str(tmp_path)])
    with pytest.raises(RetiaError, match="--family-file 'zennas'"):
        main(["--family-file", "zennas", "--output", str(tmp_path)])
    with pytest.raises(RetiaError, match="does not exist"):
        main(["--family-file", "zennas=/nonexistent.safetensors", "--output", str(tmp_path)])


def test_downstream_option_names_families(tmp_path):
    from retia.experiments.aiop_predictor import build_parser, downstream_families, main

    parse = build_parser().parse_args
    assert downstream_families(parse([]).downstream) == []
    assert downstream_families(parse(["--downstream"]).downstream) == ["hrnas-seg"]  # the flag as it always was
    assert parse(["--downstream", "--n", "5"]).n == 5
    assert downstream_families(parse(["--downstream", "hrnas-kp"]).downstream) == ["hrnas-kp"]
    assert downstream_families(parse(["--downstream", "hrnas-seg,hrnas-kp"]).downstream) == ["hrnas-seg", "hrnas-kp"]
    for value in ("bogus", "hrnas-kp,hrnas-kp", ",", "zennas"):
        with pytest.raises(RetiaError, match="--downstream .*: expected distinct names from hrnas-seg, hrnas-kp") \
                as info:
            main(["--downstream", value, "--output", str(tmp_path / "x")])
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_experiment_averages_over_several_splits(pool):
    from retia.evaluators.aiop.predictor import ParamsPredictor, split_family
    from retia.experiments.aiop_predictor import build_parser, evaluate_target

    _, graphs, labels = pool
    families = {"zennas": (graphs, labels)}
    common = ["--finetune", "6", "--seeds", "0", "1", "--predictor-epochs", "3", "--no-search"]
    several = evaluate_target("zennas", families, build_parser().parse_args(common + ["--split-seed", "0", "1", "2"]))
    single = evaluate_target("zennas", families, build_parser().parse_args(common + ["--split-seed", "0"]))
    assert [s["split_seed"] for s in several["per_split"]] == [0, 1, 2] and several["split_seeds"] == [0, 1, 2]
    # the first split is exactly the single-split run: metrics, per-seed rows and predictions
    for k in ("srcc", "kendall", "mae", "mape", "srcc_std"):
        assert several["per_split"][0]["gnn"][k] == single["metrics"]["gnn"][k]
    assert several["per_seed"]["gnn"][:2] == single["per_seed"]["gnn"]
    assert several["predictions"] == single["predictions"]
    for s in several["per_split"]:  # each split's baselines are those fitted on that split's 6 archs
        ft, te = split_family(graphs, 6, seed=s["split_seed"])
        expect = ParamsPredictor().fit([graphs[i] for i in ft], labels[ft]).score([graphs[i] for i in te], labels[te])
        assert s["params"]["srcc"] == pytest.approx(expect["srcc"])
        assert s["flops"]["srcc"] == pytest.approx(1.0)  # the labels are a line in log10(FLOPs)
    for name in ("gnn", "flops", "params", "graph_stats"):  # the reported metrics are means over the splits (and seeds)
        per = [s[name]["srcc"] for s in several["per_split"]]
        assert several["metrics"][name]["srcc"] == pytest.approx(np.mean(per))
        assert several["metrics"][name]["splits"] == 3
    assert len(several["per_seed"]["gnn"]) == 3 * 2
    for name in ("flops", "params", "graph_stats"):
        diff = [s["gnn"]["srcc"] - s[name]["srcc"] for s in several["per_split"]]
        assert several["wins"][name] == {"above": sum(d > 0 for d in diff), "splits": 3,
                                         "mean_diff": pytest.approx(np.mean(diff)), "min_diff": pytest.approx(min(diff))}
    assert several["wins"]["flops"]["above"] == 0  # nothing ranks a line in log FLOPs better than FLOPs


def test_experiment_refuses_repeated_split_seeds(tmp_path):
    from retia.experiments.aiop_predictor import main

    with pytest.raises(RetiaError, match="--split-seed 1 1: expected distinct seeds"):
        main(["--split-seed", "1", "1", "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
