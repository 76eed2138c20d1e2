"""AIO-P labelled families (retia.evaluators.aiop.family) and the shared-head shortcut (.shared_head)."""
import json

import numpy as np
import pytest
import torch

from retia.errors import RetiaError
from retia.evaluators.aiop.family import (TrainSettings, arch_graph, build_family, digits_split, evaluate_model,
                                          get_space, journal_path, label_arch, load_family, main, sample_archs)
from retia.evaluators.aiop.shared_head import activate, label_family_shared_head, rank_agreement, subnet_features

torch.set_num_threads(1)
FAST = TrainSettings(epochs=1, batch_size=256)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def af_family(tmp_path_factory):
    """A 3-arch AutoFormer family trained one quick epoch, with the trained models kept."""
    path = tmp_path_factory.mktemp("fam") / "af.safetensors"
    models = {}
    graphs = build_family("autoformer", 3, path, FAST, progress=False,
                          on_arch=lambda g, m: models.__setitem__(g.name, m))
    return path, graphs, models


def test_sampling_is_seeded_distinct_and_prefix_stable():
    a5, a8 = sample_archs("autoformer", 5, seed=1), sample_archs("autoformer", 8, seed=1)
    assert a8[:5] == a5 and len({json.dumps(a, sort_keys=True) for a in a8}) == 8
    assert sample_archs("autoformer", 5, seed=2) != a5
    z = sample_archs("zennas", 6)
    assert len(set(z)) == 6 and all(isinstance(s, str) for s in z)
    from retia.spaces import zennas

    for s in z:  # the family's nets are the space's random nets at half width
        assert max(b.out_channels for b in zennas.parse(s)) <= 64
        zennas.check_channels(s)


def test_family_file_round_trip(af_family):
    path, graphs, _ = af_family
    loaded, labels = load_family(path)
    assert [g.name for g in loaded] == [g.name for g in graphs]
    assert labels.tolist() == [g.meta["top1"] for g in graphs]
    from retia.spaces.autoformer import AutoformerSpace

    cfg = AutoformerSpace.config("micro")
    for g, orig in zip(loaded, graphs):
        assert g.ops == orig.ops and torch.equal(g.features, orig.features) and torch.equal(g.edge_index,
                                                                                           orig.edge_index)
        arch = g.meta["arch"]
        assert g.flops == AutoformerSpace.count_flops(arch, cfg) and g.params == AutoformerSpace.count_params(arch, cfg)
        assert g.meta["space"] == "autoformer" and 0 <= g.meta["top1"] <= 100
    rows = journal_path(path).read_text().splitlines()
    assert "header" in json.loads(rows[0]) and len(rows) == 4


def test_labels_equal_reevaluating_the_trained_net(af_family):
    path, graphs, models = af_family
    data = digits_split(32)
    for g in graphs:
        assert evaluate_model(models[g.name], data)["top1"] == pytest.approx(g.meta["top1"])
    g = graphs[1]  # training is seeded: the same arch and seed give the same label again
    _, again = label_arch("autoformer", g.meta["arch"], TrainSettings(epochs=1, batch_size=256,
                                                                      seed=g.meta["train_seed"]))
    assert again["top1"] == pytest.approx(g.meta["top1"])


def test_interrupted_family_resumes_without_retraining(tmp_path):
    path = tmp_path / "zen.safetensors"
    seen = []

    def stop_after_first(graph, model):
        seen.append(graph.name)
        raise Stop

    with pytest.raises(Stop):
        build_family("zennas", 3, path, FAST, progress=False, on_arch=stop_after_first)
    first, labels = load_family(path)  # the finished arch is on disk
    assert len(first) == 1 and labels[0] == first[0].meta["top1"]
    # a torn last line (killed mid-write) is ignored
    with journal_path(path).open("a") as f:
        f.write('{"name": "zennas-00')
    trained = []
    graphs = build_family("zennas", 3, path, FAST, progress=False, on_arch=lambda g, m: trained.append(g.name))
    assert len(graphs) == 3 and seen[0] not in trained and len(trained) == 2
    assert graphs[0].meta["top1"] == first[0].meta["top1"]
    assert [g.meta["arch"] for g in graphs] == sample_archs("zennas", 3)
    again = build_family("zennas", 3, path, FAST, progress=False, on_arch=lambda g, m: trained.append(g.name))
    assert len(trained) == 2 and [g.name for g in again] == [g.name for g in graphs]
    with pytest.raises(RetiaError, match="journal .* was written with"):
        build_family("zennas", 3, path, TrainSettings(epochs=2, batch_size=256), progress=False)


def test_bad_input_is_one_line():
    cases = [
        (lambda: get_space("hrnas"), "family space 'hrnas': expected one of"),
        (lambda: sample_archs("autoformer", 0), "family size 0"),
        (lambda: TrainSettings(epochs=0), "epochs 0"),
        (lambda: load_family("/nonexistent/f.safetensors"), "does not exist"),
        (lambda: build_family("zennas", 1, "f.pt"), "expected a .safetensors"),
        (lambda: main(["--space", "zennas", "--n", "2", "-o", "x.safetensors", "--shared-head"]),
         "--shared-head needs a supernet"),
        (lambda: rank_agreement([1, 2], [1, 2, 3]), "2 cheap and 3 full"),
    ]
    for fn, message in cases:
        with pytest.raises(RetiaError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


def test_rank_agreement_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(0)
    full = rng.rand(30) * 100
    cheap = full + rng.randn(30) * 20
    cheap[:4] = cheap[4]  # ties
    r = rank_agreement(cheap, full)
    assert r["srcc"] == pytest.approx(stats.spearmanr(cheap, full).statistic, abs=1e-12)
    assert r["kendall"] == pytest.approx(stats.kendalltau(cheap, full).statistic, abs=1e-12)
    assert r["n"] == 30
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40])["srcc"] == 1.0
    assert rank_agreement([4, 3, 2, 1], [10, 20, 30, 40])["kendall"] == -1.0


def test_activated_supernet_is_the_frozen_subnet():
    from retia.spaces.autoformer import AutoformerSpace

    torch.manual_seed(0)
    supernet = AutoformerSpace.build_supernet(AutoformerSpace.config("micro")).eval()
    arch = sample_archs("autoformer", 2, seed=3)[1]
    x = torch.randn(3, 3, 32, 32)
    activate(supernet, arch)
    with torch.no_grad():
        assert torch.allclose(supernet(x), supernet.freeze(arch)(x), atol=1e-6)
    feats = subnet_features(supernet, arch, x, 96)
    assert feats.shape == (3, 96) and (feats[:, arch["embed_dim"]:] == 0).all()
    assert feats[:, :arch["embed_dim"]].abs().sum() > 0


def test_shared_head_labels_a_family(af_family):
    path, graphs, _ = af_family
    report = label_family_shared_head(path, supernet_epochs=1, head_archs=2, head_epochs=1, ft_epochs=1,
                                      progress=False)
    out = json.loads(path.with_name("af.shared_head.json").read_text())
    assert report["n"] == 3 and out["report"]["srcc"] == report["srcc"]
    cheap = [out["labels"][g.name]["cheap_top1"] for g in graphs]
    assert all(0 <= c <= 100 for c in cheap)
    assert report["srcc"] == pytest.approx(rank_agreement(cheap, [g.meta["top1"] for g in graphs])["srcc"])
    assert path.with_name("af.supernet.safetensors").exists()


def test_graph_of_an_arch_matches_its_space():
    s = sample_archs("zennas", 1, seed=5)[0]
    g = arch_graph("zennas", s, "z")
    from retia.spaces import zennas

    assert g.input_shape == (1, 3, 16, 16) and g.meta["arch"] == s
    assert g.params == sum(p.numel() for p in zennas.build(s, num_classes=10).parameters())
