"""HR-NAS progressive shrinking: penalty by hand, exact physical shrinking, optimizer state, MACs bookkeeping."""
import pytest
import torch

from retia.errors import RetiaError
from retia.profile import count_flops
from retia.spaces import hrnas
from retia.spaces.hrnas import network as hnet
from retia.strategies import hrnas_shrinking as hs

torch.set_num_threads(1)


def _one_block_cfg():
    # one stage, one branch, one parallel block: blocks s0_fuse0_0 (8->8) and s0_b0_0 (8->8), no head blocks
    return hrnas.make_config(num_classes=3, input_size=16, input_channel=[8, 8], stages=[[1, [1], [8]]],
                             head_channels=None, last_channel=16, expand_ratio=1, kernel_sizes=[3, 5],
                             max_tokens=2, token_size=2)


def test_penalty_matches_hand_calculation():
    cfg = _one_block_cfg()
    net = hrnas.HRNet(cfg)
    # per hidden channel of a kernel-k branch at 4x4 (16/4), 8 in, 8 out: 8*16 + k*k*16 + 8*16
    per3, per5 = 8 * 16 + 9 * 16 + 8 * 16, 8 * 16 + 25 * 16 + 8 * 16
    # transformer with n tokens of d=4 (2x2), C=8: a = (C+2)*d + 12*d*d + C*d, b = 4*d
    a, b = 10 * 4 + 12 * 16 + 8 * 4, 16
    # two blocks, each 8 channels per kernel and a 2-token transformer
    total = 2 * (8 * per3 + 8 * per5 + (a * 2 + b * 4))
    units = 2 * (8 + 8 + 2)
    norm = total / (units + 1e-5)
    pen = hs.ResourcePenalty(net)
    assert pen.normalizer == pytest.approx(norm)
    assert pen.channel_penalty("s0_b0_0", 3) == pytest.approx(per3 / norm)
    # 2 tokens alive: a + b*(2^2 - 1^2)
    assert pen.token_penalty("s0_b0_0", 2) == pytest.approx((a + 3 * b) / norm)
    with torch.no_grad():
        for i, bn in enumerate(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.fill_(0.1 * (i % 3) - 0.05)
    expect = 0.0
    for name, block in net.blocks.items():
        for k, bn in block.depthwise_bns().items():
            expect += (per3 if k == 3 else per5) / norm * float(bn.weight.detach().abs().sum())
        g = block.transformer.input_norm.weight
        alive = int((g.abs() > 1e-3).sum())
        expect += (a + b * (alive ** 2 - max(alive - 1, 0) ** 2)) / norm * float(g.detach().abs().sum())
    assert float(pen.value(net).detach()) == pytest.approx(expect)
    # the gradient the callback adds is rho times the derivative of that value
    net.zero_grad()
    (0.5 * pen.value(net)).backward()
    auto = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    pen.add_grad(net, 0.5)
    for n, p in net.named_parameters():
        if n in auto:
            torch.testing.assert_close(p.grad, auto[n])


def test_rho_schedule_is_linear_between_free_and_warmup():
    at = hs.rho_schedule(2.0, epoch_free=1, epoch_warmup=3, steps_per_epoch=10)
    assert [at(s) for s in (0, 9, 10, 20, 30, 100)] == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]



def _random_images():
    """16 seeded random 32x32 images in 2 batches, labels 0..9; validation on the same batches."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class RandomImages(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 10),
                              batch_size=8)

        def val_dataloader(self):
            return self.train_dataloader()

    return RandomImages()

def _net_with_dead_units(cfg, seed=0):
    net = hrnas.HRNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        names = list(net.blocks)
        for i, (name, block) in enumerate(net.blocks.items()):
            for j, bn in enumerate(block.depthwise_bns().values()):
                if i == 1:
                    bn.weight.zero_()  # a whole block without branches: its constant must survive
                else:
                    bn.weight[(i + j) % 3::3] = 0.0
        assert names
    return net


def test_shrink_is_exact_and_macs_match_the_closed_form():
    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg).eval()
    small, keep = hs.shrink(net, threshold=1e-3, tokens=False)
    assert small.blocks["s0_b0_0"].pw_bn is None  # every branch of block 1 went
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)
    before, after = hrnas.count_macs(cfg, net.arch), hrnas.count_macs(cfg, small.arch)
    assert after < before
    assert count_flops(small, (1, 3, 32, 32)) == after
    # shrinking again removes nothing
    again, _ = hs.shrink(small, threshold=1e-3, tokens=False)
    assert again.arch == small.arch


def test_token_shrinking_removes_tokens_and_transformers():
    cfg = hrnas.preset("tiny")
    net = hrnas.HRNet(cfg)
    names = [n for n, b in net.blocks.items() if b.transformer is not None]
    with torch.no_grad():
        net.blocks[names[0]].transformer.input_norm.weight[:5] = 0  # 3 of 8 tokens left
        net.blocks[names[1]].transformer.input_norm.weight.zero_()  # transformer removed
    small, _ = hs.shrink(net, 1e-3)
    assert small.arch[f"{names[0]}.tokens"] == 3 and small.blocks[names[0]].transformer.tokens == 3
    assert small.arch[f"{names[1]}.tokens"] == 0 and small.blocks[names[1]].transformer is None
    assert count_flops(small, (1, 3, 32, 32)) == hrnas.count_macs(cfg, small.arch) < hrnas.count_macs(cfg)
    torch.testing.assert_close(small.blocks[names[0]].transformer.query_embed,
                               net.blocks[names[0]].transformer.query_embed[5:])


def test_optimizer_state_follows_the_kept_channels():
    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    old = {n: opt.state[p]["exp_avg"].clone() for n, p in net.named_parameters()}
    small, keep = hs.shrink(net, 1e-3)
    hs.remap_optimizer(opt, net, small, keep)
    params = dict(small.named_parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    name = "blocks.s0_fuse0_0.ops.k3.2.weight"  # projection: sliced along its input channels
    idx = keep["s0_fuse0_0"]["k3"]
    torch.testing.assert_close(opt.state[params[name]]["exp_avg"], old[name][:, idx])
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer runs on the smaller network


def test_callback_shrinks_during_lightning_training(tmp_path):
    """Two short epochs of retia's classification module with the callback: the model and optimizer are swapped
    for smaller ones, MACs drop and the history records them."""
    from retia.evaluators.classification import classification_evaluator

    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg)
    seen = []
    cb = hs.ProgressiveShrinking(rho=1e-3, epoch_warmup=1, threshold=0.05, interval=1, on_epoch=seen.append)
    evaluator = classification_evaluator(_random_images(), num_classes=10, max_epochs=2, log_dir=tmp_path,
                                         callbacks=[cb], accelerator="cpu", enable_progress_bar=False, learning_rate=1e-3,
                                         warmup_epochs=0, mixup=0.0, cutmix=0.0, report_to_nni=False)
    evaluator.evaluate(net)
    final = evaluator.module.model
    assert final is not net and final.arch != net.arch
    assert [r.epoch for r in cb.history] == [-1, 0, 1] and len(seen) == 3
    assert cb.history[1].shrunk and cb.history[-1].macs == hrnas.count_macs(cfg, final.arch) < cb.history[0].macs
    opt = evaluator.trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in final.parameters()}


def test_default_penalty_drives_scales_to_zero_and_shrinks(tmp_path):
    """The real mechanism, nothing pre-zeroed: BN scales start at 1.0, the callback's default ρ / threshold / warmup /
    interval, AdamW with cosine decay; a short seeded run on a one-block model removes channels."""
    from torch.utils.data import DataLoader, TensorDataset

    import pytorch_lightning as pl

    from retia.evaluators.classification import classification_evaluator

    class Data(pl.LightningDataModule):  # learnable: the class is the brighter colour channel
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(32, 3, 16, 16, generator=g), torch.arange(32) % 3
            x[torch.arange(32), y] += 1.0
            return DataLoader(TensorDataset(x, y), batch_size=16)

        def val_dataloader(self):
            return self.train_dataloader()

    pl.seed_everything(0, verbose=False)
    cfg = _one_block_cfg()
    net = hrnas.HRNet(cfg)
    assert all(float(bn.weight.detach().min()) == 1.0 for _, b in net.named_blocks() for bn in b.depthwise_bns().values())
    cb = hs.ProgressiveShrinking()  # defaults: rho 5e-3, threshold 1e-3 (the original's), warmup 2, interval 2
    evaluator = classification_evaluator(Data(), num_classes=3, max_epochs=30, log_dir=tmp_path, callbacks=[cb],
                                         accelerator="cpu", enable_progress_bar=False, learning_rate=0.1,
                                         weight_decay=0.0, warmup_epochs=0, mixup=0.0, cutmix=0.0,
                                         report_to_nni=False)
    evaluator.evaluate(net)
    final = evaluator.module.model
    supernet_channels = sum(v for k, v in hrnas.full_arch(cfg).items() if ".k" in k)
    kept_channels = sum(v for k, v in final.arch.items() if ".k" in k)
    assert kept_channels < supernet_channels
    assert any(r.shrunk for r in cb.history)
    macs = hrnas.count_macs(cfg, final.arch)
    assert macs < hrnas.count_macs(cfg) and count_flops(final, (1, 3, 16, 16)) == macs
    print(f"channels {supernet_channels} -> {kept_channels}, MACs {hrnas.count_macs(cfg)} -> {macs}")


# ---------------------------------------------------------------------------------------------------------------
# EMA of the weights, BN recalibration
# ---------------------------------------------------------------------------------------------------------------
def test_ema_update_is_the_original_formula_by_hand():
    """shadow <- d*shadow + (1-d)*value, d = min(decay, (1+n)/(10+n)) at the n-th update; parameters and BN running
    statistics averaged, the BN batch counter not."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        net[1].running_mean.copy_(torch.tensor([0.5, 1.0]))
    ema = hs.ModelEMA(net, decay=0.2)
    assert ema.net is not net and not any(p.requires_grad for p in ema.net.parameters())
    # update 1: d = min(0.2, 2/11) = 2/11; update 2: d = min(0.2, 3/12) = 0.2
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, 0.0]).view(2, 1, 1, 1))
        net[1].running_mean.copy_(torch.tensor([1.5, -1.0]))
        net[1].num_batches_tracked.fill_(7)
    assert ema.update(net) == pytest.approx(2 / 11)
    d = 2 / 11
    w1 = [d * 1.0 + (1 - d) * 3.0, d * -2.0 + (1 - d) * 0.0]
    m1 = [d * 0.5 + (1 - d) * 1.5, d * 1.0 + (1 - d) * -1.0]
    torch.testing.assert_close(ema.net[0].weight.flatten(), torch.tensor(w1))
    torch.testing.assert_close(ema.net[1].running_mean, torch.tensor(m1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([-1.0, 5.0]).view(2, 1, 1, 1))
    assert ema.update(net) == pytest.approx(0.2)
    w2 = [0.2 * w1[0] + 0.8 * -1.0, 0.2 * w1[1] + 0.8 * 5.0]
    torch.testing.assert_close(ema.net[0].weight.flatten(), torch.tensor(w2))
    torch.testing.assert_close(ema.net[1].running_mean, torch.tensor([0.2 * m1[0] + 0.8 * 1.5, 0.2 * m1[1] - 0.8]))
    torch.testing.assert_close(ema.net[1].running_var, torch.ones(2))  # both 1 throughout
    assert int(ema.net[1].num_batches_tracked) == 0 and ema.updates == 2
    with pytest.raises(RetiaError, match=r"^EMA decay 1\.5: expected a number in \(0, 1\)"):
        hs.ModelEMA(net, 1.5)


def test_ema_is_shrunk_with_the_same_keep_and_keeps_its_values():
    """A unit dead in the network but alive in its EMA survives (the original ORs the masks); the EMA copy is cut
    with the same indices: every surviving tensor equals the old EMA tensor indexed by keep, and (removed scales
    being 0) the smaller EMA computes what the bigger one did. At the last shrink the EMA alone decides."""
    import copy
    from types import SimpleNamespace

    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg)
    cb = hs.ProgressiveShrinking(ema_decay=0.5, threshold=1e-3)
    cb.ema.ema = hs.ModelEMA(net, 0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the live weights move (dead scales stay 0 in both), the EMA follows
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        cb.ema.ema.update(net)
    bn = net.blocks["s0_fuse0_0"].ops["k3"][1][1]
    alive = int(torch.nonzero(bn.weight.abs() > 1e-3)[0])
    with torch.no_grad():
        bn.weight[alive] = 0.0  # dead now in the network, not in its average
    keep = cb.keep(net)
    assert alive in keep["s0_fuse0_0"]["k3"].tolist()
    assert alive not in hs.shrink_keep(net, 1e-3)["s0_fuse0_0"]["k3"].tolist()
    final_keep = cb.keep(net, final=True)  # the EMA alone
    assert {b: {k: v.tolist() for k, v in e.items()} for b, e in final_keep.items()} == \
        {b: {k: v.tolist() for k, v in e.items()} for b, e in hs.shrink_keep(cb.ema.ema.net, 1e-3).items()}

    old_ema = copy.deepcopy(cb.ema.ema.net)
    old_state = {k: v.clone() for k, v in old_ema.state_dict().items()}
    module = SimpleNamespace(model=net)
    assert cb.apply_shrink(SimpleNamespace(optimizers=[]), module)
    new_ema = cb.ema.ema.net
    assert module.model.arch == new_ema.arch == hnet.arch_of_keep(net, keep) != net.arch
    checked = 0
    for name, tensor in new_ema.state_dict().items():
        if name.endswith(("pw_bn.running_mean", ".const")):
            continue  # where removed channels' constants are folded (exactness checked below)
        rule = hnet.slice_rule(name, keep)
        expected = old_state[name] if rule is None else old_state[name].index_select(rule[0], rule[1])
        assert torch.equal(tensor, expected), name
        checked += 1
    assert checked > 100
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new_ema(x), old_ema.eval()(x), rtol=1e-4, atol=1e-5)
    cb.ema.ema.update(module.model)  # the shrunk network and its EMA still pair up


def test_bn_recalibration_is_the_cumulative_average_of_batch_statistics():
    """momentum=None semantics by hand: running mean = mean of the batch means, running variance = mean of the
    unbiased batch variances, each BN seeing the previous layers in training-mode BN (batch statistics) and
    dropout off; only the first num_batches batches; momentum and train/eval mode restored."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.1),
                              torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 2, 1),
                              torch.nn.BatchNorm2d(2, momentum=0.3))
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.fill_(7.0)
            bn.running_var.fill_(9.0)
    net.train()
    batches = [(torch.randn(5, 3, 6, 6), torch.zeros(5)) for _ in range(4)]
    expect = {1: ([], []), 5: ([], [])}
    with torch.no_grad():
        for x, _ in batches[:3]:
            h = net[0](x)
            expect[1][0].append(h.mean((0, 2, 3)))
            expect[1][1].append(h.var((0, 2, 3), unbiased=True))
            bn = net[1]
            h = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                   + bn.eps)
            h = net[4](torch.relu(h * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)))
            expect[5][0].append(h.mean((0, 2, 3)))
            expect[5][1].append(h.var((0, 2, 3), unbiased=True))
    assert hs.recalibrate_bn(net, batches, 3) == 3
    for i in (1, 5):
        torch.testing.assert_close(net[i].running_mean, torch.stack(expect[i][0]).mean(0))
        torch.testing.assert_close(net[i].running_var, torch.stack(expect[i][1]).mean(0))
        assert int(net[i].num_batches_tracked) == 3
    assert (net[1].momentum, net[5].momentum) == (0.1, 0.3) and net.training and net[3].training
    assert hs.recalibrate_bn(net.eval(), batches[:2], 5) == 2 and not net.training  # fewer batches than asked
    with pytest.raises(RetiaError, match="BN recalibration batches 0: expected an int >= 1"):
        hs.recalibrate_bn(net, batches, 0)


@pytest.mark.slow
def test_callback_with_ema_and_bn_recalibration_in_lightning(tmp_path):
    """Lightning run with the EMA and BN recalibration on: one EMA update per optimizer step, the EMA shrunk with
    the network, the EMA copy is the final model (trainable again), BN statistics re-estimated on 2 batches."""
    from retia.evaluators.classification import classification_evaluator

    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg)
    cb = hs.ProgressiveShrinking(rho=1e-3, epoch_warmup=1, threshold=0.05, interval=1, ema_decay=0.99,
                                 bn_recalibration_batches=2)
    evaluator = classification_evaluator(_random_images(), num_classes=10, max_epochs=2, log_dir=tmp_path,
                                         callbacks=[cb], accelerator="cpu", enable_progress_bar=False, learning_rate=1e-3,
                                         warmup_epochs=0, mixup=0.0, cutmix=0.0, report_to_nni=False)
    evaluator.evaluate(net)
    final = evaluator.module.model
    assert final is cb.ema.ema.net and cb.ema.ema.updates == 4  # 2 epochs x 2 steps
    assert cb.history[1].shrunk and final.arch == cb.history[-1].arch != net.arch
    assert all(p.requires_grad for p in final.parameters())
    assert cb.recalibrated == 2
    assert all(int(m.num_batches_tracked) == 2 for m in final.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_flops(final, (1, 3, 32, 32)) == hrnas.count_macs(cfg, final.arch)
    assert "val_top1" in cb.history[-1].metrics


def test_shrink_takes_rank_0_keep_and_calls_on_epoch_on_rank_0_only():
    """Under DDP the keep decision is rank 0's: apply_shrink broadcasts its own keep (as lists, from src 0) and cuts
    what comes back — here a rank-0 keep with fewer channels than this rank's scales say; in one process nothing is
    broadcast. No DDP wrapper: nothing to re-wrap. on_epoch runs on the global rank 0 only."""
    from types import SimpleNamespace

    cfg = hrnas.preset("tiny")
    net = _net_with_dead_units(cfg)
    local = hs.shrink_keep(net, 1e-3)
    rank0 = {b: dict(e) for b, e in local.items()}
    rank0["s0_fuse0_0"]["k3"] = local["s0_fuse0_0"]["k3"][:2]  # rank 0 removes more of this branch
    plain = lambda keep: {b: {k: v.tolist() for k, v in e.items()} for b, e in keep.items()}  # noqa: E731

    class Strategy:
        model = None
        sent = None

        def broadcast(self, obj, src=0):
            self.sent = (obj, src)
            return plain(rank0)

    trainer = SimpleNamespace(optimizers=[], world_size=2, is_global_zero=False, strategy=Strategy())
    module = SimpleNamespace(model=net)
    cb = hs.ProgressiveShrinking(threshold=1e-3)
    assert cb.apply_shrink(trainer, module)
    assert trainer.strategy.sent == (plain(local), 0)
    assert module.model.arch == hnet.arch_of_keep(net, rank0) != hnet.arch_of_keep(net, local)
    assert module.model.arch["s0_fuse0_0.k3"] == 2
    assert not hs.rewrap_ddp(trainer)  # not a DistributedDataParallel: left alone

    single = SimpleNamespace(optimizers=[], world_size=1, strategy=Strategy())
    module = SimpleNamespace(model=_net_with_dead_units(cfg))
    assert cb.apply_shrink(single, module) and single.strategy.sent is None
    assert module.model.arch == hnet.arch_of_keep(net, local)
    assert not hs.sync_buffers(single, module.model)  # one process: nothing to make equal

    seen = []
    cb = hs.ProgressiveShrinking(on_epoch=seen.append)
    rank1 = SimpleNamespace(is_global_zero=False, num_training_batches=2, global_step=0)
    cb.on_fit_start(rank1, SimpleNamespace(model=hrnas.HRNet(cfg)))
    assert seen == [] and len(cb.history) == 1
    cb.on_fit_start(SimpleNamespace(is_global_zero=True, num_training_batches=2, global_step=0),
                    SimpleNamespace(model=hrnas.HRNet(cfg)))
    assert [r.epoch for r in seen] == [-1]
