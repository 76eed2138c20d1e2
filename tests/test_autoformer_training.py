"""Supernet training: LR schedule, loss, scratch and fine-tune entry points (safetensors checkpoints)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from retia.evaluators.classification import ClassificationModule, warmup_cosine
from retia.weights import load_meta, load_weights


def test_warmup_cosine_matches_its_formula():
    lr = warmup_cosine(total_steps=100, warmup_steps=10, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert lr(100) == pytest.approx(1e-5) and lr(1000) == pytest.approx(1e-5)


def test_mixup_loss_is_soft_target_cross_entropy():
    torch.manual_seed(0)
    module = ClassificationModule(num_classes=4, mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    module.set_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)))
    module.log = lambda *a, **k: None
    module._trainer = type("T", (), {"optimizers": [torch.optim.SGD(module.parameters(), lr=0.1)]})()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(1), np.random.seed(1)  # timm's Mixup draws lambda from numpy
    loss = module.training_step((x.clone(), y), 0)
    torch.manual_seed(1), np.random.seed(1)
    mixed, soft = module.mixup_fn(x.clone(), y)
    expected = -(soft * torch.log_softmax(module.model(mixed), dim=-1)).sum(dim=-1).mean()
    assert torch.allclose(loss, expected)
    assert torch.allclose(soft.sum(dim=1), torch.ones(6))  # targets are distributions (smoothing included)
    assert soft.min() > 0


@pytest.mark.slow
def test_scratch_then_finetune_to_another_class_count(tmp_path):
    from retia.experiments import autoformer_finetune, autoformer_scratch

    out = autoformer_scratch.main(["--output", str(tmp_path / "scratch"), "--epochs", "1", "--batch-size", "128",
                                   "--warmup", "0"])
    meta = load_meta(out)
    assert meta["kind"] == "autoformer-supernet" and meta["finished"] and meta["config"]["num_labels"] == 10
    for name in ("best.safetensors", "best.json"):
        assert (tmp_path / "scratch" / name).exists()
    assert list((tmp_path / "scratch" / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "scratch" / "logs" / "csv").rglob("metrics.csv"))

    data = tmp_path / "two"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(data / split / c / f"{i}.png")
    tuned = autoformer_finetune.main(["--weights", str(out), "--datapath", str(data), "--output",
                                      str(tmp_path / "tuned"), "--epochs", "1", "--batch-size", "4",
                                      "--learning-rate", "1e-30", "--warmup", "0", "--weight-decay", "0",
                                      "--drop-path", "0"])
    before, after = load_weights(out), load_weights(tuned)
    assert load_meta(tuned)["config"]["num_labels"] == 2 and after["head.weight"].shape[0] == 2
    same = [k for k in before if not k.startswith("head.") and torch.allclose(before[k], after[k], atol=1e-6)]
    assert len(same) == len(before) - 2  # every tensor but the new head came from the pretrained supernet
