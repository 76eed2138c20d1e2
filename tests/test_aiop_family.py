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


# ---------------------------------------------------------------------------------------------------------------
# task-generic families: the HR-NAS segmentation family, old files, the label-noise ceiling
# ---------------------------------------------------------------------------------------------------------------
SEG_FAST = TrainSettings(epochs=1, batch_size=8, lr=1e-2, weight_decay=0.01)


@pytest.fixture(scope="module")
def seg_family(tmp_path_factory):
    """A 3-arch HR-NAS segmentation family on tiny shapes data (16 train / 8 val images), trained models kept."""
    import dataclasses

    from retia.evaluators.aiop.family import SPACES

    space = dataclasses.replace(SPACES["hrnas-seg"], data_args={"num_train": 16, "num_val": 8})
    path = tmp_path_factory.mktemp("seg") / "seg.safetensors"
    models = {}
    graphs = build_family(space, 3, path, SEG_FAST, progress=False,
                          on_arch=lambda g, m: models.__setitem__(g.name, m))
    return space, path, graphs, models


def test_segmentation_family_labels_are_the_projects_miou(seg_family):
    from retia.data.segmentation import synthetic_shapes
    from retia.evaluators.aiop.family import evaluate_segmentation, family_metric, hrnas_seg_config, shapes_split
    from retia.evaluators.segmentation import confusion_matrix, scores_from_confusion
    from retia.spaces import hrnas

    space, path, graphs, models = seg_family
    loaded, labels = load_family(path)  # the metric comes from the file
    assert family_metric(path) == "miou" and labels.tolist() == [g.meta["miou"] for g in graphs]
    data = shapes_split(32, 16, 8)
    x_val, y_val = synthetic_shapes(8, 32, 1_000_003)  # the validation split: another seed than training
    assert torch.equal(data[2], x_val) and torch.equal(data[3], y_val)
    assert torch.equal(data[0], synthetic_shapes(16, 32, 0)[0])
    cfg = hrnas_seg_config()
    for g in loaded:
        model = models[g.name]
        assert 0.0 <= g.meta["miou"] <= 1.0 and 0.0 <= g.meta["pixel_acc"] <= 1.0
        # recompute from the trained model's predictions: upsample logits, argmax, confusion matrix, IoU
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(x_val), size=(32, 32), mode="bilinear",
                                                     align_corners=False)
        cm = confusion_matrix(logits.argmax(1), y_val, 4)
        iou = [cm[c, c].item() / (cm[c, :].sum() + cm[:, c].sum() - cm[c, c]).item()
               for c in range(4) if (cm[c, :].sum() + cm[:, c].sum()).item() > 0]
        assert g.meta["miou"] == pytest.approx(np.mean(iou), abs=1e-9)
        assert g.meta["miou"] == pytest.approx(float(scores_from_confusion(cm)["miou"]), abs=1e-12)
        assert evaluate_segmentation(model, data)["miou"] == pytest.approx(g.meta["miou"], abs=1e-12)
        # the graph is the space's network at 32x32: FLOPs = HR-NAS's closed-form MACs
        assert g.input_shape == (1, 3, 32, 32) and g.meta["space"] == "hrnas-seg"
        assert g.flops == hrnas.count_macs(cfg, g.meta["arch"])
        assert g.params == sum(p.numel() for p in model.parameters())
    header = json.loads(journal_path(path).read_text().splitlines()[0])["header"]
    assert header["task"] == "segmentation" and header["metric"] == "miou" and header["data"] == space.data_args
    # retraining with the stored seed gives the stored label
    g = loaded[2]
    _, again = label_arch(space, g.meta["arch"], TrainSettings(**{**header["train"], "seed": g.meta["train_seed"]}))
    assert again["miou"] == pytest.approx(g.meta["miou"])


def test_segmentation_class_weights_formula():
    from retia.evaluators.aiop.family import segmentation_class_weights

    labels = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 2, 255]])  # 6 / 2 / 1 / 0 pixels, one ignored
    raw = np.sqrt([9 / 6, 9 / 2, 9 / 1, 9 / 1])  # the absent class gets the largest weight of the others
    assert segmentation_class_weights(labels, 4).tolist() == pytest.approx((raw / raw.mean()).tolist())


def test_hrnas_sampling_spans_sizes_within_the_space():
    from retia.evaluators.aiop.family import hrnas_seg_config
    from retia.spaces import hrnas

    cfg = hrnas_seg_config()
    archs = sample_archs("hrnas-seg", 40, seed=0)
    assert archs[:10] == sample_archs("hrnas-seg", 10, seed=0)
    macs = [hrnas.count_macs(cfg, a) for a in archs]  # check_arch inside: every value within arch_choices
    assert max(macs) > 5 * min(macs) and max(macs) <= hrnas.count_macs(cfg)
    assert any(v == 0 for a in archs for k, v in a.items() if not k.endswith(".tokens"))


def test_classification_header_unchanged_and_old_family_files_load(tmp_path):
    """Files written before tasks existed (no 'metric' anywhere) load as top-1 and their journals resume."""
    from retia.evaluators.aiop.family import family_header, family_metric
    from retia.evaluators.aiop.graph import save_graphs

    old_header = {"format": "retia.aiop.family/1", "resolution": 16, "seed": 0, "space": "zennas",
                  "train": {"batch_size": 256, "epochs": 1, "lr": 0.002, "min_lr": 1e-05, "seed": 0, "warmup": 0.1,
                            "weight_decay": 0.05}}
    assert family_header("zennas", FAST) == old_header
    arch = sample_archs("zennas", 1)[0]
    labels = {"seconds": 1.0, "top1": 42.5, "top5": 90.0, "train_seed": 0}
    path = tmp_path / "old.safetensors"
    save_graphs([arch_graph("zennas", arch, "zennas-000-x", labels)], path, meta={"family": old_header})
    assert family_metric(path) == "top1" and load_family(path)[1].tolist() == [42.5]
    journal_path(path).write_text(json.dumps({"header": old_header}) + "\n"
                                  + json.dumps({"name": "zennas-000-x", "arch": arch, "labels": labels}) + "\n")
    trained = []
    graphs = build_family("zennas", 1, path, FAST, progress=False, on_arch=lambda g, m: trained.append(g))
    assert not trained and graphs[0].meta["top1"] == 42.5
    assert load_family(path)[1].tolist() == [42.5] and family_metric(path) == "top1"


def test_noise_ceiling_is_spearman_of_two_trainings(seg_family):
    stats = pytest.importorskip("scipy.stats")
    from retia.evaluators.aiop.family import noise_ceiling

    space, path, graphs, _ = seg_family
    report = noise_ceiling(path, k=3, seed_offset=7, progress=False)
    assert report["first"] == [g.meta["miou"] for g in graphs]
    assert report["srcc"] == pytest.approx(stats.spearmanr(report["first"], report["second"]).statistic, abs=1e-12)
    assert report["kendall"] == pytest.approx(stats.kendalltau(report["first"], report["second"]).statistic,
                                              abs=1e-12)
    # the second label is that arch trained with its seed + offset on the family's own data
    g = graphs[0]
    _, again = label_arch(space, g.meta["arch"], TrainSettings(**{**json.loads(
        journal_path(path).read_text().splitlines()[0])["header"]["train"], "seed": g.meta["train_seed"] + 7}))
    assert report["second"][0] == pytest.approx(again["miou"])
    saved = json.loads(path.with_name("seg.noise-o7.json").read_text())
    assert saved["srcc"] == report["srcc"]
    assert noise_ceiling(path, k=3, seed_offset=7, progress=False)["second"] == report["second"]  # from its journal


def test_task_bad_input_is_one_line(seg_family, tmp_path):
    from retia.evaluators.aiop.family import noise_ceiling

    _, path, _, _ = seg_family
    cases = [
        (lambda: noise_ceiling(path, k=1), "noise ceiling k=1: expected an int in \\[2, 3\\]"),
        (lambda: noise_ceiling(path, k=4), "k=4"),
        (lambda: noise_ceiling(path, k=2, seed_offset=0), "seed offset 0"),
        (lambda: noise_ceiling(tmp_path / "none.safetensors"), "does not exist"),
        (lambda: sample_archs("hrnas-seg", 1.5), "family size 1.5"),
        (lambda: main(["--space", "zennas", "--n", "3", "-o", str(tmp_path / "z.safetensors"),
                       "--noise-ceiling", "4"]), "--noise-ceiling 4: expected 2..3"),
    ]
    for fn, message in cases:
        with pytest.raises(RetiaError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# the HR-NAS keypoint family (OKS AP on the synthetic people, weights inherited from a trained parent)
# ---------------------------------------------------------------------------------------------------------------
KP_FAST = TrainSettings(epochs=1, batch_size=8, lr=2e-3, weight_decay=0.01)
KP_DATA = {"num_train": 16, "num_val": 8, "sigma": 1.0}


@pytest.fixture(scope="module")
def kp_family(tmp_path_factory):
    """A 2-arch HR-NAS keypoint family on 16 / 8 synthetic people (parent trained 2 steps), trained models kept;
    the synthetic data and the parent are cached in a temporary RETIA_CACHE."""
    import dataclasses

    from retia.evaluators.aiop.family import SPACES

    base = SPACES["hrnas-kp"]
    space = dataclasses.replace(base, data_args=dict(KP_DATA),
                                recipe={**base.recipe, "parent": {**base.recipe["parent"], "epochs": 1}})
    root = tmp_path_factory.mktemp("kp")
    models = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETIA_CACHE", str(root / "cache"))
        graphs = build_family(space, 2, root / "kp.safetensors", KP_FAST, progress=False,
                              on_arch=lambda g, m: models.__setitem__(g.name, m))
        yield space, root / "kp.safetensors", graphs, models


def test_keypoint_family_labels_are_the_evaluators_coco_ap(kp_family):
    from retia.data.keypoints import build_keypoint_datamodule
    from retia.evaluators import keypoints as kp
    from retia.evaluators.aiop.family import (family_metric, hrnas_kp_config, people_scores, people_split,
                                              predict_people)
    from retia.spaces import hrnas

    space, path, graphs, models = kp_family
    loaded, labels = load_family(path)
    assert family_metric(path) == "ap" and labels.tolist() == [g.meta["ap"] for g in graphs]
    data = people_split((64, 48), **KP_DATA)
    # the family's in-memory split is what the keypoint reader gives: same crops and COCO ground truth
    dm = build_keypoint_datamodule(None, input_size=(64, 48), batch_size=3, num_train=16, num_val=8,
                                   image_size=[96, 72], seed=0, sigma=1.0)
    dm.setup("validate")
    assert torch.allclose(torch.stack([dm.val_set[i][0] for i in range(8)]), data.x_val)
    for g in loaded:
        model = models[g.name]
        assert 0.0 <= g.meta["ap"] <= 1.0 and 0.0 <= g.meta["ar"] <= 1.0
        # the label is the evaluator's tested path (reader → predict_batch → COCOeval) on the trained net
        assert kp.evaluate_keypoints(model, dm)["AP"] == pytest.approx(g.meta["ap"], abs=1e-9)
        _, ref_kps, ref_scores, ids = kp.predict_keypoints(model, dm)
        kps, scores = predict_people(model, data)
        assert np.allclose(kps, ref_kps, atol=1e-4) and np.allclose(scores, ref_scores, atol=1e-5)
        assert ids.tolist() == data.val_meta["image_id"].tolist() and np.ptp(kps[..., :2]) > 10
        assert g.input_shape == (1, 3, 64, 48) and g.meta["space"] == "hrnas-kp"
        assert g.flops == hrnas.count_macs(hrnas_kp_config(), g.meta["arch"])
        assert g.params == sum(p.numel() for p in model.parameters())
    # perfect predictions (the annotated joints, score 1) score AP 1 through the family's scoring
    anns = [data.coco.loadAnns(data.coco.getAnnIds(imgIds=int(i)))[0] for i in data.val_meta["image_id"]]
    gt = np.array([np.reshape(a["keypoints"], (17, 3)) for a in anns], dtype=np.float64)
    gt[:, :, 2] = 1.0
    assert people_scores(data, gt, np.ones(len(gt)))["ap"] == pytest.approx(1.0)
    moved = gt.copy()
    moved[:, :, :2] += 6.0  # every joint 6 px off: OKS far below 0.5 on these ~40 px people
    assert people_scores(data, moved, np.ones(len(gt)))["ap"] < 0.1
    header = json.loads(journal_path(path).read_text().splitlines()[0])["header"]
    assert header["task"] == "keypoints" and header["metric"] == "ap" and header["data"] == KP_DATA
    assert header["recipe"]["parent"]["epochs"] == 1
    # retraining with the stored seed (from the same cached parent) gives the stored label
    g = loaded[1]
    _, again = label_arch(space, g.meta["arch"], TrainSettings(**{**header["train"], "seed": g.meta["train_seed"]}))
    assert again["ap"] == pytest.approx(g.meta["ap"], abs=1e-12)


def test_keypoint_archs_inherit_the_parents_most_important_channels(kp_family):
    from retia.evaluators.aiop.family import hrnas_kp_parent, importance_keep, sample_archs

    space = kp_family[0]
    parent = hrnas_kp_parent(space)
    arch = sample_archs("hrnas-kp", 1, seed=3)[0]
    keep = importance_keep(parent, arch)
    checked = 0
    for name, block in parent.named_blocks():
        for k, bn in block.depthwise_bns().items():
            idx = keep[name].get(f"k{k}")
            assert (0 if idx is None else len(idx)) == arch[f"{name}.k{k}"]
            if idx is not None and 0 < len(idx) < bn.num_features:
                gamma = bn.weight.detach().abs()
                dropped = torch.ones_like(gamma, dtype=torch.bool)
                dropped[idx] = False
                assert gamma[idx].min() >= gamma[dropped].max()
                checked += 1
    assert checked > 5
    model = space.make_init(space)(arch)  # the arch's network holding the kept channels' weights
    name = next(n for n, b in parent.named_blocks() if keep[n].get("k3") is not None and len(keep[n]["k3"]) > 1)
    src, dst = parent.blocks[name].ops["k3"][1][0].weight, model.blocks[name].ops["k3"][1][0].weight
    assert torch.equal(dst, src[keep[name]["k3"]])
    assert model.arch == {k: int(v) for k, v in arch.items()}


def test_keypoint_family_file_round_trip(kp_family):
    from retia.evaluators.aiop import family as fam
    from retia.weights import load_meta, load_weights

    space, path, graphs, _ = kp_family
    loaded, labels = load_family(path)
    assert [g.name for g in loaded] == [g.name for g in graphs] and labels.tolist() == [g.meta["ap"] for g in graphs]
    for g, orig in zip(loaded, graphs):
        assert g.ops == orig.ops and g.names == orig.names and g.input_shape == orig.input_shape
        assert torch.equal(g.features, orig.features) and torch.equal(g.edge_index, orig.edge_index)
        assert g.flops == orig.flops and g.params == orig.params and g.meta == orig.meta
    assert json.loads(path.with_suffix(".json").read_text())["meta"]["metric"] == "ap"
    assert not list(path.parent.glob("*.pt")) and not list(path.parent.glob("*.pkl"))
    # the same command again rebuilds the graphs from the journal and trains nothing
    trained = []
    again = build_family(space, 2, path, KP_FAST, progress=False, on_arch=lambda g, m: trained.append(g))
    assert not trained and [g.meta["ap"] for g in again] == labels.tolist()
    # the parent is cached as safetensors + JSON; a new process (cache cleared) loads the same weights from it
    files = list((path.parent / "cache").glob("aiop_hrnas_kp_parent_*.safetensors"))
    assert len(files) == 1 and 0.0 <= load_meta(files[0])["labels"]["ap"] <= 1.0
    first = fam.hrnas_kp_parent(space).state_dict()
    fam._hrnas_kp_parent.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETIA_CACHE", str(path.parent / "cache"))
        second = fam.hrnas_kp_parent(space).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert set(load_weights(files[0])) == set(first)


def test_keypoint_bad_input_is_one_line(kp_family, tmp_path, monkeypatch):
    from retia.evaluators.aiop.family import people_split, sample_archs

    monkeypatch.setenv("RETIA_CACHE", str(tmp_path))

    space = kp_family[0]
    arch = dict(sample_archs("hrnas-kp", 1)[0], **{"s0_b0_0.k3": 999})
    cases = [
        (lambda: people_split((30, 24)), "input_size \\(30, 24\\): expected"),
        (lambda: people_split((64, 48), sigma=0), "keypoint sigma 0: expected a number > 0"),
        (lambda: people_split((64, 48), num_train=0, num_val=1), "num_train 0"),
        (lambda: label_arch(space, arch, KP_FAST), "s0_b0_0.k3=999: expected an int in"),
        (lambda: main(["--space", "hrnas-kp", "--n", "2", "-o", str(tmp_path / "k.safetensors"), "--shared-head"]),
         "--shared-head needs a supernet"),
    ]
    for fn, message in cases:
        with pytest.raises(RetiaError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)
