"""Zen-NAS training recipe: the learning-rate schedule against the original's formula, label smoothing, mixup,
weight-decay groups, the distillation loss against a hand calculation, teachers, and end-to-end training runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from retia.errors import RetiaError
from retia.evaluators.zennas_training import (TimmStageAdapter, build_projections, distillation_loss, mixup,
                                              smoothed_one_hot, soft_cross_entropy, weight_decay_groups,
                                              zennas_datamodule, zennas_lr, zennas_training_evaluator)
from retia.spaces import zennas

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "experiments" / "zennas_train.py")]
TINY = "SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,16,2,8,1)SuperResK3K3(16,16,2,8,1)SuperConvK1BNRELU(16,32,1,1)"
TEACHER = "SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,24,2,8,1)SuperResK3K3(24,32,2,16,1)SuperConvK1BNRELU(32,48,1,1)"


def test_learning_rate_is_the_original_schedule():
    # N = 1000 images per epoch, 10 epochs, 2 warm-up epochs, base 0.4, target 0.01
    lr = lambda n: zennas_lr(n, 0.4, 0.01, 1000, 10, 2)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 2000 * 0.4)                 # (n + 1) / warm * base
    assert lr(999) == pytest.approx(1000 / 2000 * 0.4)
    assert lr(1999) == pytest.approx(0.4)                          # last warm-up instance
    assert lr(2000) == pytest.approx(0.4 + (0.01 - 0.4) * (1 - math.cos(math.pi * 1 / 8000)) / 2)
    assert lr(6000 - 1) == pytest.approx(0.4 + (0.01 - 0.4) * 0.5)  # half way: (n - warm + 1) / (stop - warm) = 1/2
    assert lr(10000 - 1) == pytest.approx(0.01)                    # the target at the end
    assert zennas_lr(5999, 0.4, 0.0, 1000, 10, 2, mode="linear") == pytest.approx(0.2)
    with pytest.raises(RetiaError, match="must exceed the warm-up"):
        zennas_lr(0, 0.1, 0.0, 100, 2, 2)


def test_smoothing_mixup_and_weight_decay_groups():
    y = torch.tensor([0, 2])
    t = smoothed_one_hot(y, 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([1 - 0.1 + 0.025, 0.025, 0.025, 0.025])) and torch.allclose(t.sum(1),
                                                                                                          torch.ones(2))
    assert torch.equal(smoothed_one_hot(y, 4), F.one_hot(y, 4).float())
    x = torch.arange(12.0).reshape(3, 4)
    torch.manual_seed(0)
    mx, mt = mixup(x, torch.eye(3), 0.2, np.random.default_rng(5))
    gamma = np.random.default_rng(5).beta(0.2, 0.2)
    torch.manual_seed(0)
    perm = torch.randperm(3)
    assert torch.allclose(mx, gamma * x + (1 - gamma) * x[perm]) and torch.allclose(mt.sum(1), torch.ones(3))
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    target = torch.tensor([[0.2, 0.7, 0.1]])
    p = np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum()
    assert float(soft_cross_entropy(logits, target)) == pytest.approx(-(np.array([0.2, 0.7, 0.1]) * np.log(p)).sum())
    net = zennas.build(TINY, 10)
    decay, no_decay = weight_decay_groups(net, weight_decay=5e-4)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert {id(p) for p in decay["params"]} == {id(m.weight) for m in convs}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_distillation_loss_by_hand():
    sf = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])           # student stage feature, 1 channel
    tf = torch.tensor([[[[0.0, 1.0], [1.0, 4.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # teacher: 2 channels
    proj = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[[[2.0]]], [[[-1.0]]]]))
        proj.bias.copy_(torch.tensor([0.0, 1.0]))
    s_logits = torch.tensor([[1.0, 0.0, -1.0]])
    t_logits = torch.tensor([[0.0, 2.0, 0.0]])
    feature, logit = distillation_loss([sf], [tf], [proj], s_logits, t_logits)
    # projected: channel 0 = 2*s, channel 1 = 1 - s
    p = np.array([[[1.0, -2.0], [4.0, 0.0]], [[0.5, 2.0], [-1.0, 1.0]]])
    d = np.abs(p - tf[0].numpy())
    smooth_l1 = np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    assert float(feature) == pytest.approx(smooth_l1)
    q = np.exp([0.0, 2.0, 0.0]) / np.exp([0.0, 2.0, 0.0]).sum()
    log_p = np.array([1.0, 0.0, -1.0]) - np.log(np.exp([1.0, 0.0, -1.0]).sum())
    assert float(logit) == pytest.approx(-(q * log_p).sum())
    # a teacher feature of another size is resized bilinearly, then clipped values are compared
    big = torch.randn(1, 2, 4, 4) * 5
    f2, _ = distillation_loss([sf], [big], [proj], s_logits, t_logits, clip=1.0)
    expected = F.smooth_l1_loss(proj(sf), F.interpolate(big.clamp(-1, 1), 2, mode="bilinear"))
    assert float(f2) == pytest.approx(float(expected))


def test_projections_and_teacher_adapters():
    student, teacher = zennas.build(TINY, 10), zennas.build(TEACHER, 10)
    projections = build_projections(student, teacher, 32, 32, 2)
    # stage features at ratios 2 and 4: student 16 and 16 channels, teacher 24 and 32 (then the last block's)
    assert [p[0].in_channels for p in projections] == [16, 16]
    assert [p[0].out_channels for p in projections] == [24, 32]
    w = projections[0][0].weight
    assert float(w.abs().max()) < 1e-3 and float(projections[0][0].bias.abs().max()) == 0  # ~N(0,1)/sqrt(fan)*1e-4
    with pytest.raises(RetiaError, match="stage features at downsampling ratio 16"):
        build_projections(student, teacher, 32, 32, 16)
    import timm

    t = TimmStageAdapter(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval())
    feats, logits = t.extract_stage_features_and_logit(torch.randn(1, 3, 64, 64), target_downsample_ratio=8)
    assert logits.shape == (1, 10) and [f.shape[2] for f in feats] == [8, 4, 2]
    with pytest.raises(RetiaError, match="no conv_stem"):
        TimmStageAdapter(nn.Linear(2, 2))


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.lrs.append((trainer.current_epoch, batch_idx, trainer.optimizers[0].param_groups[0]["lr"]))


def test_module_sets_the_schedule_every_step_and_trains(tmp_path):
    torch.manual_seed(0)
    dm = zennas_datamodule(None, image_size=16, batch_size=64, auto_augment=True, random_erase=True)
    rec = LrRecorder()
    ev = zennas_training_evaluator(dm, num_classes=10, max_epochs=2, log_dir=tmp_path, callbacks=[rec],
                                   accelerator="cpu", devices=1, limit_train_batches=3, limit_val_batches=1,
                                   enable_progress_bar=False, warmup_epochs=1, lr_per_256=0.2, student_image_size=16)
    model = zennas.build(TINY, 10)
    ev.evaluate(model)
    n_train = len(dm.train_set)
    assert [(e, b) for e, b, _ in rec.lrs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for epoch, batch, lr in rec.lrs:
        n = epoch * n_train + (batch + 1) * 64
        assert lr == pytest.approx(zennas_lr(n, 0.2 * 64 / 256, 0.0, n_train, 2, 1))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.01 for m in bns)
    opt = ev.trainer.optimizers[0]
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert "val_top1" in ev.trainer.callback_metrics


@pytest.mark.slow
def test_train_writes_safetensors_with_the_structure(tmp_path):
    out = subprocess.run(TRAIN + ["--arch", TINY, "--epochs", "2", "--image-size", "16", "--limit-train-batches", "3",
                                  "--output", str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.loads((tmp_path / "r" / "best.json").read_text())
    assert meta["structure"] == TINY and meta["num_classes"] == 10
    from retia.weights import load_weights

    net = zennas.build(meta["structure"], meta["num_classes"])
    net.load_state_dict(load_weights(tmp_path / "r" / "best.safetensors"))
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert 0 <= result["val_top1"] <= 100 and "val top-1" in out.stdout


@pytest.mark.slow
def test_distillation_from_a_zennet_teacher(tmp_path):
    from retia.weights import save_weights

    teacher = zennas.build(TEACHER, 10)
    save_weights(teacher.state_dict(), tmp_path / "teacher.safetensors")
    out = subprocess.run(TRAIN + ["--arch", TINY, "--teacher", TEACHER, "--teacher-weights",
                                  str(tmp_path / "teacher.safetensors"), "--teacher-image-size", "24",
                                  "--target-downsample-ratio", "2", "--epochs", "2", "--image-size", "16",
                                  "--limit-train-batches", "2", "--output", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = (tmp_path / "r" / "logs" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "ts_feature_loss" in metrics and "ts_logit_loss" in metrics


@pytest.mark.parametrize("argv, message", [
    (["--arch", "zennet_nope"], "zennet_nope"),
    (["--epochs", "2", "--warmup", "2"], "--warmup 2 must be smaller than --epochs 2"),
    (["--num-classes", "7"], "--num-classes 7: the data has 10 classes"),
    (["--teacher", "timm:no_such_model"], "--teacher 'timm:no_such_model'"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    from retia.experiments import zennas_train

    with pytest.raises(RetiaError, match=message.replace("(", r"\(")):
        zennas_train.main(argv + ["--output", str(tmp_path / "r")])
