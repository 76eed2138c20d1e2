"""Human keypoints: COCO OKS AP against hand calculations, heatmap encode / decode through the crop, the COCO
reader on fixture trees, the synthetic generator, plots and HR-NAS training (retia.data.keypoints,
retia.evaluators.keypoints)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from retia.data.keypoints import (COCO_FLIP_PAIRS, COCO_KEYPOINT_NAMES, COCO_SIGMAS, COCO_SKELETON, COCOKeypoints,
                                  apply_affine, box_to_center_scale, build_keypoint_datamodule, clean_bbox,
                                  crop_transform, heatmap_targets, invert_affine, load_coco, make_synthetic_coco)
from retia.errors import RetiaError
from retia.evaluators.keypoints import (KeypointModule, coco_keypoint_ap, coco_results, decode_heatmaps,
                                        evaluate_keypoints, heatmap_to_image, instance_scores, joints_mse_loss,
                                        keypoint_evaluator, object_keypoint_similarity, plot_coco,
                                        plot_keypoint_predictions, predict_batch, save_results)

THRESHOLDS = np.linspace(0.5, 0.95, 10)


# ------------------------------------------------------------------------------------------------- fixtures
def _categories():
    return [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINT_NAMES),
             "skeleton": [list(p) for p in COCO_SKELETON]}]


def _person(ann_id, image_id, joints, bbox, visible=None, area=None, iscrowd=0):
    v = np.full(17, 2) if visible is None else np.asarray(visible)
    kps = np.concatenate([np.where(v[:, None] > 0, joints, 0), v[:, None]], 1)
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": iscrowd, "bbox": list(map(float, bbox)),
            "area": float(area if area is not None else bbox[2] * bbox[3]), "num_keypoints": int((v > 0).sum()),
            "keypoints": [float(x) for x in kps.reshape(-1)]}


def _standing(x0, y0, height):
    """A plausible upright person (17, 2) whose box is about ``height`` x height/2 from (x0, y0)."""
    rel = np.array([[.5, .08], [.55, .05], [.45, .05], [.6, .07], [.4, .07], [.7, .25], [.3, .25], [.8, .42],
                    [.2, .42], [.85, .58], [.15, .58], [.62, .6], [.38, .6], [.64, .8], [.36, .8], [.65, .97],
                    [.35, .97]])
    return np.array([x0, y0]) + rel * np.array([height / 2, height])


def _write_tree(root, split="val2017", images_subdir=False, size=(100, 80)):
    """A real-layout COCO tree: image 1 with two people, a crowd region and a person with no labelled joint;
    image 2 with one person whose joints 9 and 10 are unlabelled. Images are linear gradients (R = 2x, G = 2y)
    so that crops can be checked pixel by pixel."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([2 * xx, 2 * yy, np.full_like(xx, 90)], -1).astype(np.uint8)
    folder = root / ("images" if images_subdir else "") / split
    folder.mkdir(parents=True)
    images = []
    for image_id in (1, 2):
        Image.fromarray(pixels).save(folder / f"{image_id:012d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.png", "height": h, "width": w})
    vis2 = np.full(17, 2)
    vis2[[9, 10]] = 0
    anns = [_person(1, 1, _standing(10, 20, 58), [10, 20, 30, 60]),
            _person(2, 1, _standing(50, 5, 40), [50, 5, 20, 40]),
            _person(3, 1, _standing(0, 0, 20), [0, 0, 10, 20], iscrowd=1),
            _person(4, 1, _standing(60, 50, 20), [60, 50, 10, 20], visible=np.zeros(17)),
            _person(5, 2, _standing(20, 10, 60), [20, 10, 30, 62], visible=vis2)]
    (root / "annotations").mkdir(exist_ok=True)
    data = {"images": images, "annotations": anns, "categories": _categories()}
    (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def tree(tmp_path):
    _write_tree(tmp_path, "val2017")
    _write_tree(tmp_path, "train2017")
    return tmp_path


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=8, image_size=(64, 48),
                               seed=5)


def _gt_file(tmp_path, anns, size=(200, 200)):
    images = sorted({a["image_id"] for a in anns})
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": size[0], "width": size[1]} for i in images],
            "annotations": anns, "categories": _categories()}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------- metric
def test_perfect_predictions_give_ap_one(tmp_path):
    anns = [_person(1, 1, _standing(20, 20, 120), [20, 20, 60, 120]),
            _person(2, 1, _standing(100, 30, 100), [100, 30, 50, 100]),
            _person(3, 2, _standing(40, 40, 90), [40, 40, 45, 90])]
    coco = load_coco(_gt_file(tmp_path, anns))
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.9}
               for a in anns]
    stats = coco_keypoint_ap(coco, results)
    assert [stats[k] for k in ("AP", "AP50", "AP75", "AR")] == pytest.approx([1.0] * 4)
    assert stats["APm"] == pytest.approx(1.0) and stats["APl"] == -1.0  # all areas are medium (< 96²)
    # the same through a results file
    assert coco_keypoint_ap(tmp_path / "gt.json", save_results(results, tmp_path / "res.json"))["AP"] == 1.0


def test_known_oks_gives_the_ap_of_the_formula(tmp_path):
    area = 60 * 120.0
    gt_joints = _standing(20, 20, 120)
    ann = _person(1, 1, gt_joints, [20, 20, 60, 120], area=area)
    coco = load_coco(_gt_file(tmp_path, [ann]))
    # every joint moved so that d² / (2 · area · (2σ)²) = -ln(0.72): OKS = 0.72 exactly (pycocotools' formula)
    target_oks = 0.72
    d = np.sqrt(-math.log(target_oks) * 2 * area * (2 * COCO_SIGMAS) ** 2)
    pred = gt_joints + np.stack([d * 0.6, d * 0.8], 1)
    assert object_keypoint_similarity(pred, np.array(ann["keypoints"]).reshape(17, 3), area) == \
        pytest.approx(target_oks)
    stats = coco_keypoint_ap(coco, coco_results(np.concatenate([pred, np.ones((17, 1))], 1)[None], [1.0], [1]))
    # one person: AP at a threshold is 1 if OKS >= t else 0; thresholds 0.50..0.70 pass, 0.75..0.95 fail
    assert stats["AP"] == pytest.approx(np.mean(THRESHOLDS <= target_oks)) == pytest.approx(0.5)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0
    # one joint off by 30 px, the rest exact: OKS = (16 + exp(-900 / (2 · area · (2σ_wrist)²))) / 17 = 0.942
    pred = gt_joints.copy()
    pred[9, 0] += 30
    oks = (16 + math.exp(-900 / (2 * area * (2 * COCO_SIGMAS[9]) ** 2))) / 17
    stats = coco_keypoint_ap(coco, coco_results(np.concatenate([pred, np.ones((17, 1))], 1)[None], [1.0], [1]))
    assert stats["AP"] == pytest.approx(np.mean(THRESHOLDS <= oks)) == pytest.approx(0.9)  # 0.95 fails


def test_unlabelled_joints_and_wrong_predictions(tmp_path):
    gt_joints = _standing(20, 20, 120)
    v = np.full(17, 2)
    v[:5] = 0  # face unlabelled: predictions there do not count
    ann = _person(1, 1, gt_joints, [20, 20, 60, 120], visible=v)
    coco = load_coco(_gt_file(tmp_path, [ann]))
    pred = np.concatenate([gt_joints, np.ones((17, 1))], 1)
    pred[:5, :2] += 50
    assert coco_keypoint_ap(coco, coco_results(pred[None], [1.0], [1]))["AP"] == pytest.approx(1.0)
    far = pred.copy()
    far[:, :2] += 80  # every joint far away: OKS ~ 0
    assert coco_keypoint_ap(coco, coco_results(far[None], [1.0], [1]))["AP"] == 0.0
    assert coco_keypoint_ap(coco, [])["AP"] == 0.0


def test_instance_score_is_mean_of_confident_joints():
    m = np.array([[0.9, 0.5, 0.1, 0.2, 0.7] + [0.0] * 12, [0.1] * 17])
    assert instance_scores(m).tolist() == pytest.approx([(0.9 + 0.5 + 0.7) / 3, 0.0])


# ------------------------------------------------------------------------------------------------- heatmaps
def test_decode_moves_a_quarter_pixel_towards_the_higher_neighbour():
    hm = torch.zeros(1, 3, 5, 6)
    hm[0, 0, 2, 3], hm[0, 0, 2, 4], hm[0, 0, 2, 2], hm[0, 0, 1, 3], hm[0, 0, 3, 3] = 1.0, 0.6, 0.2, 0.5, 0.5
    hm[0, 1, 0, 5], hm[0, 1, 0, 4] = 0.8, 0.7  # corner: no neighbour on one side, no shift
    hm[0, 2, 4, 1], hm[0, 2, 4, 0], hm[0, 2, 3, 1] = 0.3, 0.1, 0.2
    coords, maxvals = decode_heatmaps(hm)
    assert coords[0].tolist() == [[3.25, 2.0], [5.0, 0.0], [0.75, 4.0]]
    assert maxvals[0].tolist() == pytest.approx([1.0, 0.8, 0.3])


def test_targets_weight_zero_for_unlabelled_and_off_map_joints():
    joints = np.array([[5.0, 4.0], [5.0, 4.0], [-20.0, 3.0], [13.5, 17.0]])
    target, weight = heatmap_targets(joints, np.array([2, 0, 2, 1]), (16, 12), sigma=2.0)
    assert weight.tolist() == [1, 0, 0, 1]  # v = 0, Gaussian entirely off the map, partly on the map
    assert not target[1].any() and not target[2].any()
    assert target[0, 4, 5] == pytest.approx(1.0) and target[0, 4, 7] == pytest.approx(math.exp(-4 / 8))
    assert target[3, 15, 11] == pytest.approx(math.exp(-(2.5 ** 2 + 2 ** 2) / 8))


def _round_trip(joints, center, scale, rotation, input_size=(64, 48)):
    """image joints → crop → heatmap targets → decoded → image (the evaluation path)."""
    hm_size = (input_size[0] // 4, input_size[1] // 4)
    in_crop = apply_affine(joints, crop_transform(center, scale, rotation, input_size))
    target, weight = heatmap_targets(in_crop / 4, np.full(len(joints), 2), hm_size)
    meta = {"center": torch.tensor(center)[None], "scale": torch.tensor(scale)[None],
            "rotation": torch.tensor([rotation])}
    kps, _ = predict_batch(torch.from_numpy(target)[None], meta, input_size)
    return kps[0, :, :2], weight


def test_heatmap_round_trip_through_the_crop_recovers_joints():
    rng = np.random.default_rng(0)
    for rotation in (0.0, 17.0, -40.0):
        center, scale = np.array([130.3, 88.7]), np.array([15.6, 20.8])  # 1.3 image px per heatmap px
        matrix = crop_transform(center, scale, rotation, (64, 48))
        # random sub-pixel joints inside the crop (1.5 heatmap px from its border)
        crop_pts = np.stack([rng.uniform(6, 40, 17), rng.uniform(6, 56, 17)], 1)
        joints = apply_affine(crop_pts, invert_affine(matrix))
        got, weight = _round_trip(joints, center, scale, rotation)
        err = np.linalg.norm(got - joints, axis=1)
        # argmax + quarter shift is within 0.25 heatmap px per axis: 0.25·√2 · 1.3 = 0.46 image px
        assert weight.all() and err.max() <= 0.25 * math.sqrt(2) * 1.3 + 1e-6 and err.max() < 0.5
        # joints on heatmap pixels come back exactly
        grid = np.stack([rng.integers(1, 11, 17), rng.integers(1, 15, 17)], 1) * 4.0
        joints = apply_affine(grid, invert_affine(matrix))
        got, _ = _round_trip(joints, center, scale, rotation)
        assert np.abs(got - joints).max() < 1e-4


def test_heatmap_to_image_inverts_the_crop_for_a_batch():
    center, scale = torch.tensor([[50.0, 60.0], [10.0, 20.0]]), torch.tensor([[96.0, 128.0], [24.0, 32.0]])
    hm = torch.tensor([[[6.0, 8.0], [0.0, 0.0]], [[6.0, 8.0], [12.0, 16.0]]])  # (x, y) heatmap pixels
    img = heatmap_to_image(hm, center, scale, (64, 48))
    # 2 image px per crop px for the first crop; its centre (24, 32) is heatmap (6, 8)
    np.testing.assert_allclose(img[0], [[50.0, 60.0], [2.0, -4.0]], atol=1e-9)
    np.testing.assert_allclose(img[1], [[10.0, 20.0], [22.0, 36.0]], atol=1e-9)


# ------------------------------------------------------------------------------------------------- reader
def test_center_scale_keeps_aspect_and_pads():
    box = clean_bbox([10, 20, 30, 60], 100, 80)
    assert box == (10.0, 20.0, 39.0, 79.0)
    center, scale = box_to_center_scale(box, 48 / 64)
    assert center.tolist() == [24.5, 49.5] and scale.tolist() == pytest.approx([59 * 0.75 * 1.25, 59 * 1.25])
    assert clean_bbox([10, 20, 0, 5], 100, 80) is None


def test_reader_reads_the_real_layout(tree):
    ds = COCOKeypoints(tree, "val", (64, 48))
    assert [r["ann_id"] for r in ds.records] == [1, 2, 5]  # the crowd region and the unlabelled person skipped
    x, target, weight, meta = ds[0]
    assert x.shape == (3, 64, 48) and target.shape == (17, 16, 12) and weight.shape == (17,)
    assert meta["center"].tolist() == [24.5, 49.5] and meta["image_id"] == 1
    # the crop centre pixel (24, 32) is the box centre (24.5, 49.5): R = 2x, G = 2y on a linear gradient
    pixel = (x[:, 32, 24] * torch.tensor([0.229, 0.224, 0.225]) + torch.tensor([0.485, 0.456, 0.406])) * 255
    assert pixel.tolist() == pytest.approx([49.0, 99.0, 90.0], abs=0.01)
    # unlabelled joints (v = 0) have weight 0, the others 1
    assert ds[2][2].tolist() == [0.0 if j in (9, 10) else 1.0 for j in range(17)]
    # joints decoded from the targets come back to the annotation (0.25·√2 heatmap px · image px per heatmap px)
    kps, _ = predict_batch(target[None], {k: meta[k][None] for k in ("center", "scale", "rotation")}, (64, 48))
    px = ds.records[0]["scale"][0] / 12
    assert np.abs(kps[0, :, :2] - ds.records[0]["joints"]).max() <= 0.25 * px + 1e-4


def test_reader_accepts_images_subfolder(tmp_path):
    _write_tree(tmp_path, "val2017", images_subdir=True)
    assert len(COCOKeypoints(tmp_path, "val", 64)) == 3


def test_flip_swaps_left_and_right(tree):
    kwargs = dict(train=True, scale_factor=0.0, rotation_prob=0.0)
    plain = COCOKeypoints(tree, "train", (64, 48), flip=False, **kwargs)[0]
    flipped = COCOKeypoints(tree, "train", (64, 48), flip=True, flip_prob=1.0, **kwargs)[0]
    # the flipped crop is the mirror image (crop x → 48 − x; column 0 has no mirror inside the crop)
    assert torch.allclose(flipped[0][:, :, 1:], plain[0].flip(-1)[:, :, :-1], atol=1e-5)
    swap = list(range(17))
    for a, b in COCO_FLIP_PAIRS:
        swap[a], swap[b] = b, a
    pj, fj = plain[3]["joints"], flipped[3]["joints"]
    assert torch.allclose(fj[:, 0], 48 - pj[swap, 0], atol=1e-4)  # left wrist where the right one was, mirrored
    assert torch.allclose(fj[:, 1], pj[swap, 1], atol=1e-4)
    assert torch.equal(flipped[2], plain[2][swap])
    assert swap[9] == 10 and swap[15] == 16 and swap[0] == 0


def test_bad_input_fails_in_one_line(tmp_path, tree):
    cases = [
        (lambda: COCOKeypoints(tmp_path / "missing", "val"), "missing"),
        (lambda: build_keypoint_datamodule(tmp_path / "missing"), "missing"),
        (lambda: COCOKeypoints(tmp_path / "annotations", "val"), "person_keypoints_val2017.json"),
        (lambda: COCOKeypoints(tree, "val", (63, 48)), "(63, 48)"),
        (lambda: COCOKeypoints(tree, "val", (8, 8)), "(8, 8)"),
        (lambda: build_keypoint_datamodule(None, input_size="64"), "'64'"),
        (lambda: build_keypoint_datamodule(tree, num_train=3), "num_train"),
        (lambda: COCOKeypoints(tree, "test"), "'test'"),
    ]
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for make, named in cases:
        with pytest.raises(RetiaError) as info:
            make()
        assert named in str(info.value) and "\n" not in str(info.value), str(info.value)
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "val2017").mkdir()
    (bad / "annotations" / "person_keypoints_val2017.json").write_text("{not json")
    with pytest.raises(RetiaError, match="not COCO keypoint JSON"):
        COCOKeypoints(bad, "val")
    (bad / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": _categories()}))
    with pytest.raises(RetiaError, match="no person with labelled keypoints"):
        COCOKeypoints(bad, "val")
    img_missing = tmp_path / "noimg"
    _write_tree(img_missing, "val2017")
    (img_missing / "val2017" / "000000000002.png").unlink()
    with pytest.raises(RetiaError, match="000000000002.png"):
        COCOKeypoints(img_missing, "val")[2]


# ------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_tree_loads_and_is_deterministic(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_train=6, num_val=3, image_size=(64, 48), seed=3)
    b = make_synthetic_coco(tmp_path / "b", num_train=6, num_val=3, image_size=(64, 48), seed=3)
    c = make_synthetic_coco(tmp_path / "c", num_train=6, num_val=3, image_size=(64, 48), seed=4)
    for split, n in (("train2017", 6), ("val2017", 3)):
        coco = load_coco(a / "annotations" / f"person_keypoints_{split}.json")
        assert len(coco.getImgIds()) == n and len(coco.getAnnIds()) == n
        cat = coco.loadCats(1)[0]
        assert cat["keypoints"] == list(COCO_KEYPOINT_NAMES) and len(cat["skeleton"]) == 19
        for ann in coco.loadAnns(coco.getAnnIds()):
            k = np.array(ann["keypoints"]).reshape(17, 3)
            assert ann["num_keypoints"] == int((k[:, 2] > 0).sum()) >= 1 and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            labelled = k[k[:, 2] > 0]
            assert (labelled[:, 0] >= x).all() and (labelled[:, 0] <= x + w).all()
            assert (labelled[:, 1] >= y).all() and (labelled[:, 1] <= y + h).all()
            assert 0 <= x and x + w <= 48 + 1e-6 and 0 <= y and y + h <= 64 + 1e-6
            assert ann["area"] == pytest.approx(0.5 * w * h, abs=0.01)
            assert Image.open(a / split / coco.loadImgs(ann["image_id"])[0]["file_name"]).size == (48, 64)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 9
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


def test_synthetic_datamodule_caches_and_reads_through_the_reader(tmp_path):
    from retia.spaces import hrnas

    dm = build_keypoint_datamodule(None, batch_size=4, num_train=8, num_val=4, image_size=(64, 48),
                                   cache_dir=tmp_path)
    assert dm.root.parent == tmp_path and dm.root.name.startswith("synthetic_coco_")
    dm.prepare_data()
    assert (dm.root / "COMPLETE").is_file()
    again = build_keypoint_datamodule(None, batch_size=4, num_train=8, num_val=4, image_size=(64, 48),
                                      cache_dir=tmp_path)
    other = build_keypoint_datamodule(None, seed=1, batch_size=4, num_train=8, num_val=4, image_size=(64, 48),
                                      cache_dir=tmp_path)
    assert again.root == dm.root and other.root != dm.root
    dm.setup("fit")
    assert isinstance(dm.val_set, COCOKeypoints) and len(dm.train_set) == 8 and len(dm.val_set) == 4
    assert dm.num_joints == 17 and len(dm.val_coco.getImgIds()) == 4 and dm.val_ann_file.is_file()
    x, target, weight, meta = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 48) and target.shape == (4, 17, 16, 12) and weight.shape == (4, 17)
    net = hrnas.HRNet(hrnas.preset("tiny", task="keypoint", num_classes=17, input_size=[64, 48]))
    assert net(x).shape == target.shape == (4, 17, *dm.heatmap_size)  # the reader's heatmaps fit the head


# ------------------------------------------------------------------------------------------------- module
def test_joints_mse_loss_ignores_weight_zero_joints():
    pred, target = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    pred[0, 0] = 1.0
    pred[0, 1] = 3.0
    assert float(joints_mse_loss(pred, target, torch.tensor([[1.0, 0.0]]))) == pytest.approx(0.5 * 4 / 8)
    assert float(joints_mse_loss(pred, target, torch.tensor([[1.0, 1.0]]))) == pytest.approx(0.5 * (4 + 36) / 8)
    with pytest.raises(RetiaError, match="heatmaps"):
        joints_mse_loss(torch.zeros(1, 2, 4, 4), target, torch.ones(1, 2))


def test_shared_nni_report_mixin_keeps_segmentation_behaviour(monkeypatch):
    import nni

    from retia.evaluators.reporting import ReportScoreToNNI
    from retia.evaluators.segmentation import SegmentationModule

    reported: list[tuple[str, float]] = []
    monkeypatch.setattr(nni, "report_intermediate_result", lambda v: reported.append(("epoch", v)))
    monkeypatch.setattr(nni, "report_final_result", lambda v: reported.append(("final", v)))
    for module in (SegmentationModule(num_classes=3), KeypointModule()):
        assert isinstance(module, ReportScoreToNNI)
        monkeypatch.setattr(nni, "get_current_parameter", lambda *a: None)  # outside a trial: nothing
        module._report_score(0.25)
        module.on_fit_end()
        assert reported == []
        monkeypatch.setattr(nni, "get_current_parameter", lambda *a: {"arch": "x"})
        module._report_score(0.25)
        module._report_score(math.nan)  # skipped
        module._report_score(0.5)
        module.on_fit_end()
        assert reported == [("epoch", 25.0), ("epoch", 50.0), ("final", 50.0)]
        reported.clear()
    seg = SegmentationModule(num_classes=3, report_to_nni=False)
    seg._report_miou(0.5)
    seg.on_fit_end()
    assert reported == [] and seg._last_score_percent == 50.0


def test_module_logs_ap_reports_it_to_nni_and_matches_a_fresh_evaluation(tmp_path, monkeypatch, synthetic_root):
    import nni

    from retia.data.keypoints import COCOKeypointDataModule
    from retia.spaces import hrnas

    torch.manual_seed(0)
    dm = COCOKeypointDataModule(synthetic_root, (64, 48), batch_size=8)
    net = hrnas.HRNet(hrnas.preset("tiny", task="keypoint", num_classes=17, input_size=[64, 48]))
    reported: list[tuple[str, float]] = []
    monkeypatch.setattr(nni, "get_current_parameter", lambda *a: {"arch": "x"})
    monkeypatch.setattr(nni, "report_intermediate_result", lambda v: reported.append(("epoch", v)))
    monkeypatch.setattr(nni, "report_final_result", lambda v: reported.append(("final", v)))
    ev = keypoint_evaluator(dm, max_epochs=2, log_dir=tmp_path / "logs", accelerator="cpu",
                            enable_progress_bar=False, learning_rate=5e-3)
    assert isinstance(ev.module, KeypointModule) and ev.module.hparams.num_joints == 17
    ev.evaluate(net)
    scores, metrics = ev.module.last_scores, ev.trainer.callback_metrics
    assert float(metrics["val_ap"]) == pytest.approx(scores["AP"]) and "val_ap50" in metrics
    assert float(metrics["train_loss"]) > 0 and "val_loss" in metrics
    assert len(ev.module.last_results) == 8 and ev.module.last_results[0]["category_id"] == 1
    assert [k for k, _ in reported] == ["epoch", "epoch", "final"]
    assert reported[-1][1] == pytest.approx(100 * scores["AP"])
    assert evaluate_keypoints(net, dm) == pytest.approx(scores)


def test_plot_coco_writes_a_png(tmp_path, synthetic_root):
    from retia.data.keypoints import COCOKeypointDataModule
    from retia.results import _pyplot
    from retia.spaces import hrnas

    image = np.full((64, 48, 3), 200, dtype=np.uint8)
    kps = np.concatenate([_standing(10, 5, 50), np.full((17, 1), 0.9)], 1)
    kps[3, 2] = 0.1  # below the threshold: not drawn
    path = plot_coco(image, kps, tmp_path / "one.png")
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert path.stat().st_size > 1000 and drawn.shape[0] > 64
    reds = ((drawn[..., 0] > 150) & (drawn[..., 1] < 100) & (drawn[..., 2] < 100)).sum()
    blues = ((drawn[..., 2] > 150) & (drawn[..., 0] < 100)).sum()
    assert reds > 20 and blues > 20  # left limbs red, right limbs blue
    plt = _pyplot()
    fig, ax = plt.subplots()
    assert plot_coco(image, kps, ax) is ax and len(ax.lines) > 17
    plt.close(fig)
    dm = COCOKeypointDataModule(synthetic_root, (64, 48), batch_size=4)
    net = hrnas.HRNet(hrnas.preset("tiny", task="keypoint", num_classes=17, input_size=[64, 48]))
    grid = plot_keypoint_predictions(net, dm, tmp_path / "grid.png", num=6, cols=3)
    assert Image.open(grid).size[0] > 300


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_hrnas_tiny_learns_synthetic_keypoints(tmp_path):
    """The CPU recipe of docs/hrnas.md shortened: 5 epochs of 32 steps (batch 8, lr 1e-2 as keypoint_cpu.yml) on
    the 256 synthetic people, σ = 1 heatmaps, light augmentation. Measured: val AP 0.213, AP50 0.687 (untrained:
    0.0); the bars are half."""
    import pytorch_lightning as pl

    from retia.spaces import hrnas

    pl.seed_everything(0)
    dm = build_keypoint_datamodule(None, batch_size=8, cache_dir=tmp_path / "cache", sigma=1.0, scale_factor=0.25,
                                   rotation_prob=0.0)
    net = hrnas.HRNet(hrnas.preset("tiny", task="keypoint", num_classes=17, input_size=[64, 48]))
    before = evaluate_keypoints(net, dm)
    ev = keypoint_evaluator(dm, max_epochs=5, log_dir=tmp_path / "logs", accelerator="cpu",
                            enable_progress_bar=False, learning_rate=1e-2)
    ev.evaluate(net)
    after = ev.module.last_scores
    assert before["AP"] < 0.01 and before["AP50"] < 0.05, before
    assert after["AP"] > 0.10 and after["AP50"] > 0.34, after
    assert evaluate_keypoints(net, dm)["AP"] == pytest.approx(after["AP"])
