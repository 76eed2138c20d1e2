"""The shared AdamW + warmup-cosine recipe (retia.evaluators.optim)."""
import math

import pytest
import torch
from torch import nn

from retia.evaluators.optim import adamw, adamw_warmup_cosine, decay_groups, warmup_cosine


def _net():
    # no conv bias before the BN: its gradient is float noise around 0, which Adam's normalisation turns into +-lr
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def test_warmup_cosine_hand_values():
    lr = warmup_cosine(total_steps=10, warmup_steps=2, base_lr=1.0, warmup_lr=0.0, min_lr=0.1)
    assert lr(0) == 0.0 and lr(1) == 0.5 and lr(2) == 1.0
    assert lr(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # halfway through the cosine
    assert lr(10) == pytest.approx(0.1) and lr(50) == pytest.approx(0.1)


def test_decay_groups_split_by_dimension_and_predicate():
    net = _net()
    groups = decay_groups(net.named_parameters(), 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [p.ndim for p in groups[0]["params"]] == [4, 2]  # conv and linear weights
    assert len(groups[1]["params"]) == 3  # BN weight and bias, linear bias
    only_bias = decay_groups(net.named_parameters(), 0.05, no_decay=lambda n, p: n.endswith("bias"))
    assert len(only_bias[0]["params"]) == 3 and len(only_bias[1]["params"]) == 2


def test_adamw_is_fused_on_cpu_and_matches_the_loop():
    a, b = _net(), _net()
    fused = adamw(decay_groups(a.named_parameters(), 0.05), lr=1e-2)
    loop = torch.optim.AdamW(decay_groups(b.named_parameters(), 0.05), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_for_non_float_parameters():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = adamw([p], lr=1e-3)
    assert not opt.defaults["fused"]


def test_lightning_recipe_schedule_per_step():
    class _Trainer:
        estimated_stepping_batches, max_epochs = 20, 4

    out = adamw_warmup_cosine(_net(), _Trainer(), learning_rate=0.1, weight_decay=0.01, warmup_epochs=1,
                              warmup_lr=1.0, min_lr=1e-3)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    # warmup of 20 * 1/4 = 5 steps starting at min(warmup_lr, lr) = lr: flat 0.1, then cosine to 1e-3 at step 20
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.1) and seen[5] == pytest.approx(0.1)
    assert seen[20] == pytest.approx(1e-3)
    assert seen[10] == pytest.approx(1e-3 + 0.5 * (0.1 - 1e-3) * (1 + math.cos(math.pi * 5 / 15)))
