"""HR-NAS space: presets and heads, arch dicts, best_model.json, freeze == sliced supernet, closed-form MACs."""
import json

import pytest
import torch
from torch import nn

from retia.errors import RetiaError
from retia.profile import count_flops
from retia.spaces import hrnas
from retia.spaces.hrnas import network as hnet

torch.set_num_threads(1)


def _small(**kw):
    return hrnas.preset("tiny", **kw)


def _randomize_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name,kw,shape", [
    ("tiny", {}, (2, 10)),
    ("tiny", dict(task="segmentation", num_classes=5, head_channels=None, last_channel=32), (2, 5, 8, 8)),
    ("tiny", dict(task="keypoint", num_classes=17, head_channels=None, last_channel=32, input_size=[32, 24]),
     (2, 17, 8, 6)),
    ("tiny", dict(head_channels=None), (2, 10)),
])
def test_heads_forward_shapes_and_macs(name, kw, shape):
    cfg = hrnas.preset(name, **kw)
    net = hrnas.HRNet(cfg).eval()
    h, w = hnet.input_hw(cfg)
    assert tuple(net(torch.randn(2, 3, h, w)).shape) == shape
    assert hrnas.count_macs(cfg) == count_flops(net, (1, 3, h, w))


def test_every_preset_builds_with_its_layout():
    for name in hrnas.PRESETS:
        cfg = hrnas.preset(name)
        lay = hrnas.layout(cfg)
        assert len({b.name for b in lay.blocks}) == len(lay.blocks)
        if name in ("cpu", "tiny"):  # small enough to build and run here
            net = hrnas.HRNet(cfg).eval()
            h, w = hnet.input_hw(cfg)
            out = net(torch.randn(1, 3, h, w))
            assert out.shape == (1, cfg["num_classes"])
            assert hrnas.count_macs(cfg) == count_flops(net, (1, 3, h, w))
            # transformers are really built (one of the original's defects)
            assert sum(b.transformer is not None for b in net.blocks.values()) > 0


# (out channels, stride) of the 67 blocks of the original's searched ImageNet network (its checkpoint.json)
ORIGINAL_BLOCKS = (
    "24,1 24,1 18,1 36,2 18,1 18,1 36,1 36,1 18,1 18,1 36,2 36,1 72,2 18,1 18,1 36,1 36,1 72,1 72,1 72,1 "
    "18,1 18,1 36,2 36,1 36,1 72,2 72,1 144,2 18,1 18,1 36,1 36,1 72,1 72,1 72,1 144,1 144,1 144,1 144,1 "
    "18,1 18,1 36,2 36,1 36,1 72,2 72,1 72,1 144,2 144,1 18,1 18,1 36,1 36,1 72,1 72,1 72,1 144,1 144,1 "
    "144,1 144,1 36,1 72,1 144,1 320,1 72,2 144,2 320,2")


def test_original_layout_block_count_and_order():
    lay = hrnas.layout(hrnas.preset("cls_imagenet"))
    expected = [tuple(int(v) for v in pair.split(",")) for pair in ORIGINAL_BLOCKS.split()]
    assert [(b.oup, b.stride) for b in lay.blocks] == expected
    assert [b.name for b in lay.blocks[:4]] == ["s0_fuse0_0", "s0_b0_0", "s1_fuse0_0", "s1_new1"]
    assert lay.blocks[0].hidden == 96 and lay.blocks[0].oup == 24


def test_width_multiplier_scales_channels_and_macs():
    full, quarter = hrnas.preset("cls_imagenet"), hrnas.preset("cls_imagenet", width_mult=0.5, round_nearest=2)
    a, b = hrnas.layout(full), hrnas.layout(quarter)
    assert a.stem == (24, 24) and b.stem == (12, 12)
    assert a.stages[-1][2] == [18, 36, 72, 144] and b.stages[-1][2] == [10, 18, 36, 72]  # make_divisible(9, 2) = 10
    assert b.last_channel == 800 and b.head_channels == [18, 36, 72, 160]
    assert hrnas.make_divisible(9, 2) == 10 and hrnas.make_divisible(4.5, 8) == 8
    # MACs scale about quadratically with the width (the depthwise part linearly)
    ratio = hrnas.count_macs(quarter) / hrnas.count_macs(full)
    assert 0.2 < ratio < 0.4
    net = hrnas.HRNet(hrnas.preset("tiny", width_mult=1.0))
    assert net.stem[0][0].out_channels == 16 and hrnas.HRNet(hrnas.preset("tiny")).stem[0][0].out_channels == 8


def test_arch_round_trips_through_best_model_json(tmp_path):
    cfg = _small()
    arch = hrnas.full_arch(cfg)
    g = torch.Generator().manual_seed(1)
    for key, maximum in hrnas.arch_choices(cfg).items():
        arch[key] = int(torch.randint(0, maximum + 1, (1,), generator=g))
    setting = hrnas.to_best_model(cfg, arch)
    assert len(setting) == len(hrnas.layout(cfg).blocks)
    assert all(len(e) == 6 and e[1] == 1 and e[5] is True and len(e[3]) == len(e[4]) and 0 not in e[4]
               for e in setting)
    path = hrnas.write_best_model(tmp_path / "best_model.json", cfg, arch)
    assert json.loads(path.read_text()) == setting
    back = hrnas.read_best_model(path, cfg, tokens=hrnas.tokens_list(cfg, arch))
    assert back == arch
    # the original's own entry format: [out, 1, stride, kernels, channels, expand]; [] = block without branches
    first = setting[0]
    assert first[0] == hrnas.layout(cfg).blocks[0].oup


def test_freeze_equals_supernet_with_removed_scales_zeroed():
    space = hrnas.HRNASSpace("tiny")
    assert space.network.arch == hrnas.full_arch(space.config)  # NNI's default sample is the supernet
    _randomize_bn(space.network)
    arch = dict(space.full_arch())
    for i, key in enumerate(k for k in arch if not k.endswith(".tokens")):
        arch[key] = [arch[key] // 2, 0, 3, arch[key]][i % 4]
    sub = space.freeze(arch)
    assert isinstance(sub, hrnas.HRNet) and sub.arch == arch
    ref = hrnas.HRNet(space.config)
    ref.load_state_dict(space.network.state_dict())
    with torch.no_grad():  # zero the scales of every channel the arch leaves out
        for name, block in ref.blocks.items():
            for k, bn in block.depthwise_bns().items():
                bn.weight[arch[f"{name}.k{k}"]:] = 0
    ref.eval(), sub.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(sub(x), ref(x), rtol=1e-4, atol=1e-5)
    assert hrnas.count_macs(space.config, arch) == count_flops(sub, (1, 3, 32, 32)) < hrnas.count_macs(space.config)


def test_nni_sample_is_the_arch_dict():
    space = hrnas.HRNASSpace("tiny")
    labels = set(space.simplify())
    assert labels == set(hrnas.arch_choices(space.config))
    sample = {}
    net = space.random(memo=sample, random_state=__import__("numpy").random.RandomState(0))  # NNI freezes it
    assert isinstance(net, hrnas.HRNet) and set(sample) == labels
    assert net.arch == hrnas.check_arch(space.config, sample)
    assert hrnas.count_macs(space.config, sample) == count_flops(net, (1, 3, 32, 32))


@pytest.mark.parametrize("bad,needle", [
    (dict(width_mult=0), "width_mult 0: expected a number > 0"),
    (dict(task="detect"), "task 'detect': expected one of"),
    (dict(kernel_sizes=[3, 4]), "kernel_sizes [3, 4]: expected distinct odd ints"),
    (dict(bogus=1), "unknown key(s) bogus"),
])
def test_bad_config_is_one_line(bad, needle):
    with pytest.raises(RetiaError) as err:
        hrnas.preset("tiny", **bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_arch_and_best_model_are_one_line(tmp_path):
    cfg = _small()
    arch = hrnas.full_arch(cfg)
    key = next(iter(arch))
    for change, needle in [({key: arch[key] + 1}, f"{key}={arch[key] + 1}: expected an int in [0, {arch[key]}]"),
                           ({key: "x"}, f"{key}='x': expected an int"),
                           ({"nope.k3": 1}, "unknown key 'nope.k3'")]:
        with pytest.raises(RetiaError) as err:
            hrnas.HRNet(cfg, dict(arch, **change))
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RetiaError, match="missing key"):
        hrnas.check_arch(cfg, {k: v for k, v in arch.items() if k != key})
    with pytest.raises(RetiaError, match="blocks, expected"):
        hrnas.from_best_model(cfg, [[8, 1, 1, [3], [4], True]])
    with pytest.raises(RetiaError, match="does not exist"):
        hrnas.read_best_model(tmp_path / "none.json", cfg)
    with pytest.raises(RetiaError, match="preset 'huge'"):
        hrnas.preset("huge")


# --- fast forward == reference forward ------------------------------------------------------------------------
def _fast_and_reference(cfg, dtype=torch.float64, batch=3, train=True, seed=0):
    """The same network twice; one step of (sum of squares of the output) through the fast forward and through
    ``reference_forward``: outputs, input gradients, both networks."""
    torch.manual_seed(seed)
    fast = hrnas.HRNet(cfg).to(dtype).train(train)
    _randomize_bn(fast, seed)
    ref = hrnas.HRNet(cfg).to(dtype).train(train)
    ref.load_state_dict(fast.state_dict())
    h, w = hnet.input_hw(cfg)
    x = torch.randn(batch, 3, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f = fast(xf)
    out_f.square().sum().backward()
    with hnet.reference_forward():
        out_r = ref(xr)
        out_r.square().sum().backward()
    return fast, ref, (out_f, out_r), (xf.grad, xr.grad)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(task="segmentation", num_classes=5, head_channels=None, last_channel=32),
    dict(input_size=[32, 24], kernel_sizes=[3, 7], active_fn="hswish"),
])
@pytest.mark.parametrize("merge_depthwise", [True, False])
def test_fast_forward_equals_reference_in_float64(kw, merge_depthwise, monkeypatch):
    # no dropout, so both paths compute the same function; float64, so rounding cannot hide a wrong formula
    cfg = hrnas.preset("tiny", dropout=0.0, transformer_dropout=0.0, **kw)
    if not merge_depthwise:  # every hidden tensor over the limit: one depthwise conv per kernel branch
        monkeypatch.setattr(hnet, "MERGED_DEPTHWISE_MAX_NUMEL", 0)
    modes = []
    apply = hnet._DepthwiseConvFn.apply
    monkeypatch.setattr(hnet._DepthwiseConvFn, "apply", lambda *a: modes.append(a[-1]) or apply(*a))
    merged = []
    orig = hnet.Block._branches_merged
    monkeypatch.setattr(hnet.Block, "_branches_merged", lambda self, x: merged.append(1) or orig(self, x))
    one_conv = []
    orig_dw = hnet._depthwise_merged
    monkeypatch.setattr(hnet, "_depthwise_merged", lambda convs, x: one_conv.append(len(convs)) or orig_dw(convs, x))
    fast, ref, (out_f, out_r), (gx_f, gx_r) = _fast_and_reference(cfg)
    # the fast paths really ran: merged branches, their depthwise convs as one zero-padded conv (or not), both
    # depthwise backwards (maps of 2x2 and 4x4 in `tiny`)
    assert len(merged) == len(fast.blocks) and {"matrix", "batch-conv"} <= set(modes)
    assert (len(one_conv) == len(fast.blocks)) if merge_depthwise else not one_conv
    assert out_f.shape == out_r.shape and out_f.is_contiguous()
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-9, atol=1e-10)
    grads_r = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, rtol=1e-8, atol=1e-10, msg=name)
    state_r = ref.state_dict()  # running statistics and batch counters updated alike
    assert list(fast.state_dict()) == list(state_r)
    for name, t in fast.state_dict().items():
        torch.testing.assert_close(t, state_r[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fast_forward_float32_and_eval_close_to_reference():
    cfg = hrnas.preset("tiny", dropout=0.0, transformer_dropout=0.0)
    _, _, (out_f, out_r), _ = _fast_and_reference(cfg, dtype=torch.float32, batch=4)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    # eval mode with the default dropouts (inactive): the same function too
    _, _, (out_f, out_r), (gx_f, gx_r) = _fast_and_reference(hrnas.preset("tiny"), train=False)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["matrix", "batch-conv"])
@pytest.mark.parametrize("c,h,w,k,s", [(3, 2, 2, 7, 1), (2, 2, 1, 5, 1), (4, 1, 1, 3, 1), (3, 4, 4, 5, 1),
                                       (2, 4, 4, 7, 2), (3, 3, 3, 5, 2), (2, 5, 3, 3, 2)])
def test_depthwise_backward_formulas_equal_torch(mode, c, h, w, k, s):
    g = torch.Generator().manual_seed(k * 10 + s)
    x = torch.randn(3, c, h, w, dtype=torch.float64, generator=g)
    wt = torch.randn(c, 1, k, k, dtype=torch.float64, generator=g)
    x1, w1 = x.clone().requires_grad_(), wt.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), wt.clone().requires_grad_()
    y1 = hnet._DepthwiseConvFn.apply(x1, w1, s, k // 2, mode)
    y2 = torch.nn.functional.conv2d(x2, w2, None, s, k // 2, 1, c)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # the forward is torch's conv itself
    gy = torch.randn(y1.shape, dtype=torch.float64, generator=g)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_fast_dropout_masks_keep_rate_and_scale():
    like = torch.empty(0)
    masks = hnet._keep_masks((0.25,) * 4, True, like, [(200, 100), (300, 100), (100, 100), (400, 100)])
    for m in masks:
        assert set(m.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
        assert abs(float((m == 0).double().mean()) - 0.25) < 0.02  # n >= 10000: 5 sigma < 0.022
    assert not torch.equal(masks[0][:100], masks[2])  # independent draws
    assert hnet._keep_masks((0.25,) * 2, False, like, [(3,), (3,)]) == [None, None]
    mixed = hnet._keep_masks((0.0, 1.0), True, like, [(5,), (5,)])
    assert mixed[0] is None and float(mixed[1].abs().sum()) == 0.0


def test_forward_hooks_see_every_branch_module():
    net = hrnas.HRNet(_small()).train()
    block = net.blocks["s1_b0_0"]
    seen = []
    handles = [block.ops[f"k{k}"][0][2].register_forward_hook(lambda m, i, o, k=k: seen.append((k, o.shape[1])))
               for k in block.kernel_sizes]
    net(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert seen == [(k, c) for k, c in zip(block.kernel_sizes, block.channels)]


def test_sync_batchnorm_blocks_take_the_module_path():
    """SyncBatchNorm must see its inputs through its own forward (cross-rank statistics): a converted network's
    blocks do not run their branches merged."""
    net = hrnas.HRNet(hrnas.preset("tiny"))
    blocks = [m for m in net.modules() if isinstance(m, hnet.Block) and len(m.ops) > 1]
    assert blocks and all(b._mergeable() for b in blocks)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert not any(b._mergeable() for b in synced.modules() if isinstance(b, hnet.Block) and len(b.ops) > 1)
