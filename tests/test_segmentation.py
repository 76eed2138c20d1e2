"""Semantic segmentation: the mIoU metric against hand calculations, the synthetic data, the Cityscapes / ADE20K
readers on fixture trees, and a short HR-NAS training run (retia.data.segmentation, retia.evaluators.segmentation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from retia.data import (IGNORE_INDEX, SegmentationFolder, SegmentationFolderDataModule, SyntheticShapesDataModule,
                        build_segmentation_datamodule, detect_segmentation_layout, synthetic_shapes)
from retia.errors import RetiaError
from retia.evaluators.segmentation import (SegmentationMetrics, SegmentationModule, confusion_matrix,
                                           scores_from_confusion, segmentation_evaluator)


# ------------------------------------------------------------------------------------------------- metric
def test_perfect_prediction_gives_miou_one():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    m = SegmentationMetrics(3)
    m.update(target.clone(), target)
    s = m.compute()
    assert float(s["miou"]) == 1.0 and float(s["pixel_acc"]) == 1.0
    assert s["iou"].tolist() == [1.0, 1.0, 1.0]


def test_known_confusion_matrix_gives_its_miou():
    # rows = target, cols = prediction
    cm = torch.tensor([[3, 1, 0],
                       [2, 4, 1],
                       [0, 0, 5]])
    # IoU_0 = 3 / (3 + 1 + 2) = 1/2 ; IoU_1 = 4 / (4 + 3 + 1) = 1/2 ; IoU_2 = 5 / (5 + 1 + 0) = 5/6
    s = scores_from_confusion(cm)
    assert s["iou"].tolist() == pytest.approx([0.5, 0.5, 5 / 6])
    assert float(s["miou"]) == pytest.approx((0.5 + 0.5 + 5 / 6) / 3)
    assert float(s["pixel_acc"]) == pytest.approx(12 / 16)
    # the same matrix built from pixels, through confusion_matrix and the Metric
    target = torch.tensor([0] * 4 + [1] * 7 + [2] * 5)
    pred = torch.tensor([0, 0, 0, 1] + [0, 0, 1, 1, 1, 1, 2] + [2] * 5)
    assert torch.equal(confusion_matrix(pred, target, 3), cm)
    m = SegmentationMetrics(3)
    m.update(pred[:9].view(1, 1, 9), target[:9].view(1, 1, 9))  # two updates accumulate
    m.update(pred[9:].view(1, 1, 7), target[9:].view(1, 1, 7))
    assert float(m.compute()["miou"]) == pytest.approx((0.5 + 0.5 + 5 / 6) / 3)


def test_ignore_label_is_excluded():
    target = torch.tensor([[[0, 1, IGNORE_INDEX, IGNORE_INDEX]]])
    pred = torch.tensor([[[0, 1, 0, 1]]])  # wrong guesses on ignored pixels do not count
    s = SegmentationMetrics(2).to("cpu")
    s.update(pred, target)
    out = s.compute()
    assert float(out["miou"]) == 1.0 and float(out["pixel_acc"]) == 1.0
    assert int(s.confmat.sum()) == 2


def test_class_absent_from_pred_and_target_is_left_out_of_the_mean():
    # class 2 appears nowhere: its IoU is NaN and the mean is over classes 0 and 1 only
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    s = scores_from_confusion(confusion_matrix(pred, target, 3))
    assert s["iou"][:2].tolist() == pytest.approx([1 / 2, 2 / 3]) and math.isnan(float(s["iou"][2]))
    assert float(s["miou"]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a class predicted but never labelled has IoU 0 and does count
    pred2 = torch.tensor([[[0, 2, 1, 1]]])
    s2 = scores_from_confusion(confusion_matrix(pred2, target, 3))
    assert s2["iou"].tolist() == pytest.approx([1 / 2, 1.0, 0.0])
    assert float(s2["miou"]) == pytest.approx(0.5)
    # nothing labelled at all: NaN, not a fake 0 or 1
    assert math.isnan(float(scores_from_confusion(torch.zeros(3, 3, dtype=torch.long))["miou"]))


def test_metric_agrees_with_torchmetrics_jaccard():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)
    target[:, :3] = IGNORE_INDEX
    target[target == 3] = 4  # class 3 never labelled ...
    pred = torch.randint(0, 5, (4, 16, 16), generator=g)
    pred[pred == 3] = 2  # ... nor predicted
    ours = SegmentationMetrics(5)
    ours.update(pred, target)
    ref = MulticlassJaccardIndex(num_classes=5, ignore_index=IGNORE_INDEX, average="macro")
    assert float(ours.compute()["miou"]) == pytest.approx(float(ref(pred, target)), rel=1e-6)


def test_metric_upsamples_logits_to_the_label_size():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :, 4:] = 1
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 0, :, 0] = 5.0  # left half: class 0, right half: class 1, at 1/4 resolution; bilinear
    logits[:, 1, :, 1] = 5.0  # upsampling puts the crossover exactly between columns 3 and 4
    m = SegmentationMetrics(2)
    m.update(logits, target)
    assert float(m.compute()["miou"]) == 1.0


# ------------------------------------------------------------------------------------------------- synthetic data
def test_synthetic_shapes_are_deterministic_and_labelled():
    x, y = synthetic_shapes(12, 32, seed=3)
    x2, y2 = synthetic_shapes(12, 32, seed=3)
    x3, _ = synthetic_shapes(12, 32, seed=4)
    assert x.shape == (12, 3, 32, 32) and y.shape == (12, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert set(y.unique().tolist()) == {0, 1, 2, 3}
    assert all((y[i] > 0).any() for i in range(12))  # every image has at least one shape
    # shapes differ from the background in colour on average (the task is learnable)
    fg = x.permute(1, 0, 2, 3)[:, y > 0].mean(1)
    bg = x.permute(1, 0, 2, 3)[:, y == 0].mean(1)
    assert (fg - bg).abs().max() > 0.1


def test_synthetic_datamodule():
    dm = SyntheticShapesDataModule(image_size=32, num_train=20, num_val=6, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 32, 32)
    assert len(dm.train_set) == 20 and len(dm.val_set) == 6 and dm.num_classes == 4
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape[0] == 6
    assert not torch.equal(yv, synthetic_shapes(6, 32, seed=0)[1])  # val comes from another seed than train
    assert isinstance(build_segmentation_datamodule(None, image_size=32), SyntheticShapesDataModule)
    with pytest.raises(RetiaError, match="batch_size 0"):
        SyntheticShapesDataModule(batch_size=0)


# ------------------------------------------------------------------------------------------------- readers
def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _cityscapes_tree(root):
    rng = np.random.default_rng(0)
    for split, city, n in (("train", "aachen", 2), ("val", "frankfurt", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                 rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            label = np.array([[0, 7, 8, 11, 26, 33, 34, 255]] * 6, dtype=np.uint8)
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return root


def _ade_tree(root):
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            stem = f"ADE_{split[:5]}_{i:08d}"
            _png(base / "images" / split / f"{stem}.jpg", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
            _png(base / "annotations" / split / f"{stem}.png",
                 np.array([[0, 1, 2, 150, 151, 0, 3]] * 5, dtype=np.uint8))
    return root


def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path):
    root = _cityscapes_tree(tmp_path / "cityscapes")
    assert detect_segmentation_layout(root) == ("cityscapes", root)
    val = SegmentationFolder(root, "val")
    assert val.name == "cityscapes" and val.num_classes == 19 and len(val) == 1
    image, label = val[0]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    # 0 unlabeled → 255, 7 road → 0, 8 sidewalk → 1, 11 building → 2, 26 car → 13, 33 bicycle → 18, 34 → 255
    assert label[0].tolist() == [255, 0, 1, 2, 13, 18, 255, 255]
    dm = SegmentationFolderDataModule(root, crop_size=4, batch_size=2, scale_range=(1.0, 1.0))
    dm.setup("fit")
    assert dm.num_classes == 19 and len(dm.train_set) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 4, 4) and y.shape == (2, 4, 4)
    assert set(y.unique().tolist()) <= {0, 1, 2, 13, 18, 255}
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (1, 3, 6, 8) and yv.shape == (1, 6, 8)  # full size, batch 1


def test_ade20k_reader_shifts_labels_and_ignores_zero(tmp_path):
    root = _ade_tree(tmp_path / "ade")
    name, resolved = detect_segmentation_layout(root)
    assert name == "ade20k" and resolved == root / "ADEChallengeData2016"
    assert detect_segmentation_layout(resolved)[0] == "ade20k"  # the inner folder works too
    train = SegmentationFolder(root, "train")
    assert train.num_classes == 150 and len(train) == 2 and train.split == "training"
    _, label = train.read(0)
    assert label[0].tolist() == [255, 0, 1, 149, 255, 255, 2]
    dm = build_segmentation_datamodule(root, image_size=8, batch_size=2, eval_size=[4, 6])
    assert isinstance(dm, SegmentationFolderDataModule) and dm.num_classes == 150
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 3, 4, 6) and y.shape == (1, 4, 6)  # resized for evaluation
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 8, 8)  # crop larger than the image: padded with 255
    assert (y == IGNORE_INDEX).any()


def test_bad_paths_fail_in_one_line_naming_the_path(tmp_path):
    with pytest.raises(RetiaError, match="does not exist") as e:
        detect_segmentation_layout(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetiaError, match="leftImg8bit.*ADEChallengeData2016") as e:
        SegmentationFolderDataModule(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value) and "\n" not in str(e.value)
    root = _cityscapes_tree(tmp_path / "cs")
    next((root / "gtFine" / "val" / "frankfurt").iterdir()).unlink()
    with pytest.raises(RetiaError, match="gtFine_labelIds.png.*does not exist; expected Cityscapes"):
        SegmentationFolder(root, "val")
    with pytest.raises(RetiaError, match="is cityscapes, not ade20k"):
        SegmentationFolderDataModule(root, dataset="ade20k")
    with pytest.raises(RetiaError, match="split 'test'"):
        SegmentationFolder(root, "test")


# ------------------------------------------------------------------------------------------------- training
def test_module_hparams_and_loss_ignore():
    module = SegmentationModule(num_classes=3, learning_rate=1e-3)
    assert module.hparams.num_classes == 3 and module.hparams.ignore_index == 255
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    y = torch.full((2, 8, 8), IGNORE_INDEX)
    loss, up = module._loss(logits, y)
    assert float(loss) == 0.0 and up.shape == (2, 3, 8, 8)
    y[0, 0, 0] = 1
    loss, up = module._loss(logits, y)
    assert float(loss) == pytest.approx(float(-torch.log_softmax(up[0, :, 0, 0], 0)[1]))


def test_hrnas_tiny_segmentation_trains_and_reports_miou(tmp_path, monkeypatch):
    import nni
    import pytorch_lightning as pl

    from retia.spaces import hrnas

    torch.manual_seed(0)
    dm = SyntheticShapesDataModule(image_size=32, num_train=48, num_val=16, batch_size=8, seed=0)
    cfg = hrnas.preset("tiny", task="segmentation", num_classes=4, input_size=32)
    net = hrnas.HRNet(cfg)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 8, 8)  # logits at 1/4 of the input

    losses: list[float] = []
    reported: list[tuple[str, float]] = []  # pretend to be inside an NNI trial
    monkeypatch.setattr(nni, "get_current_parameter", lambda *a: {"arch": "x"})
    monkeypatch.setattr(nni, "report_intermediate_result", lambda v: reported.append(("epoch", v)))
    monkeypatch.setattr(nni, "report_final_result", lambda v: reported.append(("final", v)))

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    evaluator = segmentation_evaluator(dm, max_epochs=4, log_dir=tmp_path / "logs", callbacks=[Record()],
                                       accelerator="cpu", enable_progress_bar=False, learning_rate=5e-3)
    evaluator.evaluate(net)
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    scores = evaluator.module.last_scores
    metrics = evaluator.trainer.callback_metrics
    assert 0.0 <= scores["miou"] <= 1.0 and len(scores["iou"]) == 4
    assert float(metrics["val_miou"]) == pytest.approx(scores["miou"], abs=1e-6)
    assert float(metrics["val_pixel_acc"]) > 0.5  # beats chance (the background alone is ~0.8 of the pixels)
    assert [k for k, _ in reported] == ["epoch"] * 4 + ["final"]  # mIoU in % to NNI, as top-1 for classification
    assert reported[-1][1] == pytest.approx(100 * scores["miou"]) == pytest.approx(reported[-2][1])
    # the reported value matches the confusion matrix of a fresh pass over the validation set
    net.eval()
    m = SegmentationMetrics(4)
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            m.update(net(x), y)
    assert float(m.compute()["miou"]) == pytest.approx(scores["miou"], abs=1e-6)
