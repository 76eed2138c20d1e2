"""Zen-NAS space: grammar round trips, counting against hand calculations and the original's numbers,
the built modules, the search-space candidates and mutations, the ZenNet zoo, official weights, the CLI."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import retia.spaces.zennas as z
from retia.errors import RetiaError
from retia.profile import count_flops
from retia.spaces.zennas import tools

REFERENCE = Path("/work/shared/reference/zennet")
PKG_STRUCTURES = Path(z.__file__).parent / "structures"

# get_model_size(), get_FLOPs(res), get_num_layers() of idstcv/ZenNAS Masternet.MasterNet (commit d1d617e,
# no_create=True, num_classes 1000), run on the 12 published structures.
ORIGINAL_COUNTS = {
    "zennet_cifar_model_size05M_res32.txt": (32, 1001097, 135485696.0, 16),
    "zennet_cifar_model_size1M_res32.txt": (32, 1491985, 155677728.0, 18),
    "zennet_cifar_model_size2M_res32.txt": (32, 2475881, 478668832.0, 20),
    "zennet_imagenet1k_flops400M_res224.txt": (224, 5673833, 399976216.0, 14),
    "zennet_imagenet1k_flops600M_res224.txt": (224, 7088025, 597745802.0, 14),
    "zennet_imagenet1k_flops900M_res224.txt": (224, 13249321, 908691864.0, 16),
    "zennet_imagenet1k_latency01ms_res224.txt": (224, 30050273, 1746251272.0, 10),
    "zennet_imagenet1k_latency02ms_res224.txt": (224, 49651521, 3399515612.0, 13),
    "zennet_imagenet1k_latency03ms_res224.txt": (224, 85333321, 4851721884.0, 16),
    "zennet_imagenet1k_latency05ms_res224.txt": (224, 118113153, 8281355000.0, 20),
    "zennet_imagenet1k_latency08ms_res224.txt": (224, 182399457, 13856146544.0, 25),
    "zennet_imagenet1k_latency12ms_res224.txt": (224, 180473441, 21841846720.0, 30),
}


def _structure_files() -> list[Path]:
    files = sorted(REFERENCE.glob("*.txt")) if REFERENCE.is_dir() else []
    return files or sorted(PKG_STRUCTURES.glob("*.txt"))


def _read(path: Path) -> str:
    return path.read_text().strip()


# ---------------------------------------------------------------------------------------------- grammar


def test_package_data_matches_reference():
    pkg = sorted(p.name for p in PKG_STRUCTURES.glob("*.txt"))
    assert len(pkg) == 12
    if REFERENCE.is_dir():
        assert pkg == sorted(p.name for p in REFERENCE.glob("*.txt"))
        for name in pkg:
            assert _read(PKG_STRUCTURES / name) == _read(REFERENCE / name)


@pytest.mark.parametrize("path", _structure_files(), ids=lambda p: p.stem)
def test_round_trip_published_structures(path):
    s = _read(path)
    specs = z.parse(s)
    assert z.to_string(specs) == s
    assert all(isinstance(b, z.SuperBlock) for b in specs)
    assert specs[0].in_channels == 3


def test_parse_gives_dataclasses_and_accepts_whitespace_and_labels():
    s = "SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,1)"
    a, b = z.parse(s)
    assert dataclasses.is_dataclass(b)
    assert (b.in_channels, b.out_channels, b.stride, b.bottleneck_channels, b.sub_layers) == (8, 16, 2, 8, 1)
    assert b.kernel_size == 3 and type(b).__name__ == "SuperResK1K3K1"
    assert z.parse(" SuperConvK3BNRELU( 3, 8,1,1)\n SuperResK1K3K1(8,16,2,8,1) ") == [a, b]
    labelled = "SuperConvK3BNRELU(stem|3,8,1,1)" + "SuperResK1K3K1(8,16,2,8,1)"
    assert z.to_string(z.parse(labelled)) == labelled
    assert z.parse(labelled) == [a, b]  # labels do not take part in equality
    assert z.to_string(dataclasses.replace(b, out_channels=24)) == "SuperResK1K3K1(8,24,2,8,1)"


def test_basic_and_composite_tokens_round_trip():
    s = ("ConvKX(3,8,3,2)BN(8)RELU(8)ResBlock(ConvKX(8,8,3,1)BN(8)RELU(8)SE(8)ConvKXG2(8,8,3,1)BN(8))"
         "ResBlockProj(8,2,ConvDW(8,3,2)BN(8)ConvKX(8,16,1,1))Sequential(MaxPool(16,3,1)Swish(16))")
    specs = z.parse(s)
    assert z.to_string(specs) == s
    assert [type(b).__name__ for b in specs] == ["ConvKX", "BN", "RELU", "ResBlock", "ResBlockProj", "Sequential"]
    res = specs[4]
    assert (res.in_channels, res.out_channels, res.stride, res.has_proj) == (8, 16, 2, True)
    model = z.build(s, 5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("bad, token", [
    ("SuperConvK3BNRELU(3,8,1,1)SuperResK9K9(8,16,1,8,1)", "SuperResK9K9(8,16,1,8,1)"),
    ("SuperConvK3BNRELU(3,8,1)", "SuperConvK3BNRELU(3,8,1)"),
    ("SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,x,1,8,1)", "SuperResK3K3(8,x,1,8,1)"),
    ("SuperConvK3BNRELU(3,0,1,1)", "SuperConvK3BNRELU(3,0,1,1)"),
    ("SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,16,1,8,1", "SuperResK3K3(8,16,1,8,1"),
    ("SuperConvK3BNRELU(3,8,1,1))", "SuperConvK3BNRELU(3,8,1,1))"),
    ("SuperConvK3BNRELU(3,8,1,1)oops", "oops"),
    ("", "empty"),
])
def test_bad_strings_raise_one_line_errors_naming_the_token(bad, token):
    with pytest.raises(RetiaError) as err:
        z.parse(bad)
    msg = str(err.value)
    assert "\n" not in msg and token in msg


def test_channel_mismatch_is_reported_by_build():
    with pytest.raises(RetiaError, match=r"SuperConvK1BNRELU\(256,512,1,1\).*256.*512"):
        z.build(z.INITIAL_STRUCTURES["imagenet_latency"], 1000)


# -------------------------------------------------------------------------------------------- counting


def test_analyze_single_superconv_by_hand():
    # SuperConvK3BNRELU(3,16,1,2) on 32x32, 10 classes: conv 3x3 3->16, BN, ReLU, conv 3x3 16->16, BN, ReLU
    flops = 3 * 16 * 9 * 32 * 32 + 32 * 32 * 16 + 16 * 16 * 9 * 32 * 32 + 32 * 32 * 16 + 16 * 10
    params = 3 * 16 * 9 + 16 + 16 * 16 * 9 + 16 + 16 * 10 + 1  # BN counted once per channel, bias counted as 1
    a = z.analyze("SuperConvK3BNRELU(3,16,1,2)", 32, 10)
    assert a == {"params": params, "flops": float(flops), "layers": 2}
    assert (params, flops) == (2929, 2834592)
    # stride 2: every count at the reduced resolution for the second layer, the first conv at (32²/4)
    a2 = z.analyze("SuperConvK3BNRELU(3,16,2,1)", 32, 10)
    assert a2["flops"] == 3 * 16 * 9 * 32 * 32 // 4 + 16 * 16 * 16 + 160


def _k1kxk1_by_hand(cin, cout, stride, btl, k, res):
    """One sub-layer of SuperResK1KXK1 as the original counts it: two bottlenecks, the first with a projection."""
    r = res // stride
    first = (cin * btl * res ** 2 + res ** 2 * btl                      # 1x1 conv + BN
             + btl * btl * k * k * res ** 2 // stride ** 2 + r ** 2 * btl  # KxK conv (strided) + BN
             + btl * cout * r ** 2 + r ** 2 * cout                      # 1x1 conv + BN
             + (cin * cout + cout) * (r / stride) ** 2)                 # projection, at (out res / stride)²
    second = (cout * btl * r ** 2 + r ** 2 * btl + btl * btl * k * k * r ** 2 + r ** 2 * btl
              + btl * cout * r ** 2 + r ** 2 * cout)
    p_first = cin * btl + btl + btl * btl * k * k + btl + btl * cout + cout + cin * cout + cout
    p_second = cout * btl + btl + btl * btl * k * k + btl + btl * cout + cout
    return first + second, p_first + p_second


def test_analyze_superresk1k3k1_by_hand():
    s = "SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,4,1)"
    stem_flops, stem_params = 3 * 8 * 9 * 32 * 32 + 32 * 32 * 8, 3 * 8 * 9 + 8
    f, p = _k1kxk1_by_hand(8, 16, 2, 4, 3, 32)
    a = z.analyze(s, 32, 10)
    assert a["flops"] == stem_flops + f + 16 * 10
    assert a["params"] == stem_params + p + 16 * 10 + 1
    assert a["layers"] == 2
    assert (a["flops"], a["params"]) == (409760.0, 1089)


def test_analyze_idw_and_se_by_hand():
    # SuperResIDWE2K3(8,16,2,8,1) at res 16: hidden widths smart_round(8*2)=16 and smart_round(16*2)=32
    blk = "SuperResIDWE2K3(8,16,2,8,1)"
    r = 8
    first = (8 * 16 * 256 + 256 * 16 + 16 * 9 * 256 // 4 + r * r * 16 + 16 * 8 * r * r + r * r * 8
             + (8 * 8 + 8) * (r / 2) ** 2)
    second = (8 * 32 * r * r + r * r * 32 + 32 * 9 * r * r + r * r * 32 + 32 * 16 * r * r + r * r * 16
              + (8 * 16 + 16) * (r / 1) ** 2)  # 8 -> 16 channels: a projection shortcut, stride 1
    pf = 8 * 16 + 16 + 16 * 9 + 16 + 16 * 8 + 8 + 8 * 8 + 8
    ps = 8 * 32 + 32 + 32 * 9 + 32 + 32 * 16 + 16 + 8 * 16 + 16
    a = z.analyze("SuperConvK1BNRELU(3,8,1,1)" + blk, 16, 4)
    stem_f, stem_p = 3 * 8 * 256 + 256 * 8, 3 * 8 + 8
    assert a["flops"] == stem_f + first + second + 16 * 4
    assert a["params"] == stem_p + pf + ps + 16 * 4 + 1
    # SE(C): C·s + s·C + C + C·res² FLOPs, C·s + 2s + s·C + 2C params, s = round(C/4)
    se = z.analyze("SuperConvK1BNRELU(3,8,1,1)" + blk, 16, 4, use_se=True)
    se16, se32 = (16 * 4 * 2 + 16 + 16 * r * r), (32 * 8 * 2 + 32 + 32 * r * r)
    assert se["flops"] - a["flops"] == se16 + se32
    assert se["params"] - a["params"] == (16 * 4 * 2 + 2 * 4 + 2 * 16) + (32 * 8 * 2 + 2 * 8 + 2 * 32)


@pytest.mark.parametrize("name, expected", sorted(ORIGINAL_COUNTS.items()))
def test_analyze_equals_original_on_published_structures(name, expected):
    res, params, flops, layers = expected
    a = z.analyze(_read(PKG_STRUCTURES / name), res, 1000)
    assert (a["params"], a["flops"], a["layers"]) == (params, flops, layers)


def test_analyze_cifar_1m_and_budget():
    # ZenNet-1M (CIFAR): the original counts 985105 params (< the 1M budget it was searched with), 155.17M FLOPs
    a = z.analyze(z.structure_of("zennet_cifar10_model_size1M_res32"), 32, 10)
    assert a == {"params": 985105, "flops": 155170848.0, "layers": 18}
    assert z.num_layers(z.structure_of("zennet_cifar10_model_size1M_res32")) == 18


def _numel_as_original_counts(model: z.ZenNet) -> int:
    """sum(numel) minus what the original's counting leaves out: BN's bias (one of its two per-channel
    parameters), a projection's BN (it counts the conv bias instead), the classifier bias beyond 1."""
    total = sum(p.numel() for p in model.parameters())
    se_bns = {id(m) for se in model.modules() if isinstance(se, z.SqueezeExcite) for m in (se.bn1, se.bn2)}
    for m in model.modules():
        if isinstance(m, z.Residual) and m.proj is not None:
            total -= 2 * m.proj[1].num_features
            se_bns.add(id(m.proj[1]))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in se_bns:
            total -= m.num_features
    return total - (model.num_classes - 1)


@pytest.mark.parametrize("opts", [{}, {"use_se": True}, {"no_reslink": True}, {"no_BN": True, "no_reslink": True}])
def test_params_equal_numel_where_counting_agrees(opts):
    for s in [z.structure_of("zennet_cifar10_model_size05M_res32"), z.INITIAL_STRUCTURES["imagenet_flops"]]:
        model = z.build(s, 10, **opts)
        assert z.analyze(s, 32, 10, **opts)["params"] == _numel_as_original_counts(model)
        assert model.get_model_size() == z.analyze(s, 32, 10, **opts)["params"]
    # without BN and residual links the two agree up to the classifier bias alone
    s = z.structure_of("zennet_cifar10_model_size05M_res32")
    bare = z.build(s, 10, no_BN=True, no_reslink=True)
    assert z.analyze(s, 32, 10, no_BN=True, no_reslink=True)["params"] == sum(p.numel() for p in bare.parameters()) - 9


def test_flops_equal_torch_flop_counter_without_bn_and_shortcuts():
    # torch counts conv / linear multiply-adds only; with no BN and no shortcuts nothing else is counted
    for s, res in [("SuperConvK3BNRELU(3,16,2,1)SuperResK3K3(16,24,2,8,2)SuperResIDWE4K5(24,32,2,16,1)"
                    "SuperResK1K7K1(32,40,1,16,1)SuperConvK1BNRELU(40,64,1,1)", 64),
                   (z.structure_of("zennet_cifar10_model_size05M_res32"), 32)]:
        model = z.build(s, 10, no_BN=True, no_reslink=True)
        assert z.analyze(s, res, 10, no_BN=True, no_reslink=True)["flops"] == count_flops(model, (1, 3, res, res))


# ---------------------------------------------------------------------------------------------- model


def _cheap_instance(structure: str, num_classes: int, **kw) -> z.ZenNet:
    """The real module tree without the cost of random init (the big ImageNet ZenNets have up to 180M params)."""
    with torch.device("meta"):
        model = z.build(structure, num_classes, **kw)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return model


@pytest.mark.parametrize("path", _structure_files(), ids=lambda p: p.stem)
def test_published_structures_build_and_run(path):
    s = _read(path)
    cifar = "cifar" in path.name
    n = 10 if cifar else 1000
    model = z.build(s, n) if (cifar or "flops400M" in path.name) else _cheap_instance(s, n)
    model.eval()
    x = torch.randn(2, 3, 32, 32) if cifar else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_pre_GAP(x)
    assert y.shape == (x.shape[0], n) and torch.isfinite(y).all()
    assert feats.shape[:2] == (x.shape[0], z.parse(s)[-1].out_channels)
    assert model.structure == s


def test_model_options_change_the_module_tree():
    s = "SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,2)SuperConvK1BNRELU(16,32,1,1)"
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    full, bare = z.build(s, 10), z.build(s, 10, no_BN=True, no_reslink=True)
    assert {"Residual", "BatchNorm2d"} <= kinds(full)
    assert not {"Residual", "BatchNorm2d"} & kinds(bare)
    assert "SqueezeExcite" in kinds(z.build(s, 10, use_se=True))
    assert all(m.eps == 1e-3 for m in full.modules() if isinstance(m, nn.BatchNorm2d))
    # first residual unit has a projection, the others (same channels, stride 1) the identity
    units = [m for m in full.blocks[1].layers if isinstance(m, z.Residual)]
    assert [u.proj is not None for u in units] == [True, False, False, False]
    x = torch.randn(2, 3, 16, 16)
    assert bare(x).shape == (2, 10)


def test_dropout_only_in_training():
    s = z.structure_of("zennet_cifar10_model_size05M_res32")
    model = z.build(s, 10, dropout=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(x))
    with pytest.raises(RetiaError):
        z.build(s, 10, dropout=1.5)


def test_init_parameters_zeroes_last_bn_of_residual_units():
    model = z.build("SuperConvK3BNRELU(3,8,1,1)SuperResK3K3(8,16,2,8,2)", 10)
    model.init_parameters()
    for unit in model.blocks[1].layers:
        if isinstance(unit, z.Residual):
            bns = [m for m in unit.body if isinstance(m, nn.BatchNorm2d)]
            assert torch.count_nonzero(bns[-1].weight) == 0 and torch.all(bns[0].weight == 1)


# ---------------------------------------------------------------------------------------- search space


def test_candidate_blocks_xxbl_by_formula():
    s = z.INITIAL_STRUCTURES["cifar"]
    # block 1 is SuperResK3K3(8,16,1,8,1): widths 16·{2.5,2,1.5,1.25,1,1/1.25,1/1.5,1/2,1/2.5}, at least 8, rounded
    # to multiples of 8 half-to-even (20 -> 16, 12.8 -> 16, 10.7 -> 8) give {40,32,24,16,8}; the bottleneck 8
    # gives {16,8}; sub-layers {1,2,3} (0 and -1 dropped): 5·2·3 = 30 candidates per block type
    lists = z.candidate_blocks(s, 1, "XXBL")
    types = [sorted({c.split("(")[0] for c in lst}) for lst in lists]
    # per group of 3 types the original's lists alias: [t1+t2, t1+t2+t3, t1+t2+t3]
    assert [len(x) for x in lists] == [60, 90, 90, 60, 90, 90]
    assert types[0] == ["SuperResK1K3K1", "SuperResK1K5K1"] and types[3] == ["SuperResK3K3", "SuperResK5K5"]
    assert types[2] == ["SuperResK1K3K1", "SuperResK1K5K1", "SuperResK1K7K1"]
    assert "SuperResK1K7K1(8,40,1,16,3)" in lists[1] and "SuperResK1K7K1(8,40,1,16,3)" not in lists[0]
    assert {int(c.split(",")[1]) for c in lists[5]} == {40, 32, 24, 16, 8}
    assert {int(c.split(",")[3]) for c in lists[5]} == {16, 8}
    assert {int(c.split(",")[4][:-1]) for c in lists[5]} == {1, 2, 3}
    # the stem SuperConvK3BNRELU(3,8,1,1) only changes its width: 8·ratios -> {16, 8}
    assert z.candidate_blocks(s, 0, "XXBL") == [["SuperConvK3BNRELU(3,16,1,1)", "SuperConvK3BNRELU(3,8,1,1)"]]


def test_candidate_blocks_idw_keeps_the_last_1x1_conv():
    s = z.INITIAL_STRUCTURES["imagenet_flops"]
    assert z.candidate_blocks(s, 5, "IDW") == [["SuperConvK1BNRELU(128,2048,1,1)"]]
    assert len(z.candidate_blocks(s, 5, "XXBL")[0]) > 1  # XXBL changes it (capped at 2048)
    assert max(int(c.split(",")[1]) for c in z.candidate_blocks(s, 5, "XXBL")[0]) == 2048
    lists = z.candidate_blocks(s, 2, "IDW")
    assert len(lists) == 12
    types = {c.split("(")[0] for c in lists[-1]}
    assert types == {f"SuperResIDWE{e}K{k}" for e in (1, 2, 4, 6) for k in (3, 5, 7)}


def test_split_follows_the_original():
    s = "SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,7)SuperResK3K3(16,16,1,8,5)"
    assert z.split(s) == ("SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,3)SuperResK1K3K1(16,16,1,8,4)"
                          "SuperResK3K3(16,16,1,8,5)")
    assert z.num_layers(z.split(s)) == z.num_layers(s) == 13


@pytest.mark.parametrize("space, init", [("XXBL", "cifar"), ("IDW", "imagenet_flops"), ("XXBL", "imagenet_latency")])
@pytest.mark.parametrize("method", ["original", "adlik"])
def test_mutate_gives_valid_chained_structures(space, init, method):
    rng = random.Random(0)
    pop = [z.INITIAL_STRUCTURES[init]]
    changed = 0
    for _ in range(60):
        parent = rng.choice(pop)
        child = z.split(z.mutate(parent, space, rng, num_replaces=2, method=method))
        specs = z.parse(child)
        assert z.to_string(specs) == child
        if method == "original" or init != "imagenet_latency":
            z.check_channels(child)  # every block takes its predecessor's channels
        assert all(b.sub_layers < 6 for b in specs)
        assert specs[0].in_channels == 3
        changed += child != parent
        pop.append(child)
    assert changed > 30
    if space == "IDW" and method == "original":
        assert all(z.parse(p)[-1].out_channels == 2048 for p in pop)


def test_mutate_is_reproducible_and_changes_one_block():
    s = z.INITIAL_STRUCTURES["cifar"]
    assert z.mutate(s, "XXBL", 7) == z.mutate(s, "XXBL", random.Random(7))
    specs, child = z.parse(s), z.parse(z.mutate(s, "XXBL", 3, num_replaces=1))
    diff = [i for i, (a, b) in enumerate(zip(specs, child)) if a.to_string() != b.to_string()]
    assert len(child) == len(specs) and 1 <= len(diff) <= 2  # the block, and possibly the next one's input
    with pytest.raises(RetiaError, match="unknown search space"):
        z.mutate(s, "nope", 0)
    with pytest.raises(RetiaError, match="method"):
        z.mutate(s, "XXBL", 0, method="nope")


def test_adlik_mutation_rules():
    s = "SuperConvK3BNRELU(3,32,2,1)SuperResK3K3(32,64,2,600,3)SuperConvK1BNRELU(64,128,1,1)"

    class Fixed(random.Random):  # block 1, width ratio 2.5, type SuperResK1K5K1, sub-layers +1
        def randint(self, a, b):
            return 1

        def choice(self, seq):
            seq = list(seq)
            if 2.5 in seq:
                return 2.5
            if +1 in seq and -2 in seq:
                return 1
            return z.get_block_type("SuperResK1K5K1")

    child = z.mutate(s, "XXBL", Fixed(), method="adlik")
    # width 64·2.5 = 160; bottleneck min(smart_round(1500), 512) = 512; sub-layers 3 + 1
    assert child == "SuperConvK3BNRELU(3,32,2,1)SuperResK1K5K1(32,160,2,512,4)SuperConvK1BNRELU(160,128,1,1)"


def test_random_structure_follows_the_adlik_initialisation():
    rng = random.Random(0)
    for space in ("XXBL", "IDW"):
        for _ in range(20):
            s = z.random_structure(rng, space)
            specs = z.check_channels(s)
            n = len(specs)
            assert 6 <= n <= 10
            assert z.to_string(specs[:1]) == "SuperConvK3BNRELU(3,32,2,1)"
            assert type(specs[-1]).__name__ == "SuperConvK1BNRELU"
            strides = [b.stride for b in specs]
            assert strides == [2 if i <= 3 or i == round((n + 2) / 2) else 1 for i in range(n)]
            mids = specs[1:-1]
            assert all(b.sub_layers == 1 and b.out_channels % 8 == 0 and 8 <= b.bottleneck_channels <= 120
                       for b in mids)
            assert all(("IDW" in type(b).__name__) == (space == "IDW") for b in mids)


def test_dict_view_maps_one_to_one():
    s = z.structure_of("zennet_imagenet1k_flops400M_SE_res224")
    d = z.to_dict(s)
    assert d["blocks"][1] == {"type": "SuperResIDWE1K7", "in_channels": 16, "out_channels": 40, "stride": 2,
                              "bottleneck_channels": 40, "sub_layers": 1}
    assert z.from_dict(d) == s
    with pytest.raises(RetiaError):
        z.from_dict({"blocks": [{"type": "SuperResK3K3", "in_channels": 3}]})


def test_register_custom_block_type():
    from dataclasses import dataclass

    @z.register_block
    @dataclass(frozen=True)
    class SuperResK3K1Test(z.SuperResBlock):  # a KxK conv then a 1x1 conv, residual
        def expand(self, opts=z.DEFAULT_OPTIONS):
            layers, c_in, stride = [], self.in_channels, self.stride
            for i in range(self.sub_layers):
                body = [z.ConvKX(c_in, self.bottleneck_channels, 3, stride), z.BN(self.bottleneck_channels),
                        z.RELU(self.bottleneck_channels), z.ConvKX(self.bottleneck_channels, self.out_channels, 1, 1),
                        z.BN(self.out_channels)]
                layers += self._unit(body, self.out_channels, i == 0, opts)
                c_in, stride = self.out_channels, 1
            return layers

    try:
        s = "SuperConvK3BNRELU(3,8,1,1)SuperResK3K1Test(8,16,2,8,1)"
        assert z.to_string(z.parse(s)) == s
        a = z.analyze(s, 16, 10)
        stem = 3 * 8 * 9 * 256 + 256 * 8
        body = 8 * 8 * 9 * 256 // 4 + 64 * 8 + 8 * 16 * 64 + 64 * 16 + (8 * 16 + 16) * (8 / 2) ** 2
        assert a["flops"] == stem + body + 160
        assert z.build(s, 10)(torch.randn(1, 3, 16, 16)).shape == (1, 10)
        z.register_space("custom", z.SearchSpace("custom", (("SuperResK3K1Test",),)))
        assert all(c.startswith("SuperResK3K1Test(") for c in z.candidate_blocks(s, 1, "custom")[0])
        assert z.mutate(s, "custom", 0).startswith("SuperConvK3BNRELU(3,")
        with pytest.raises(RetiaError, match="already registered"):
            z.register_block(dataclass(frozen=True)(type("SuperResK3K1Test", (z.SuperResBlock,), {})))
    finally:
        z.unregister_block("SuperResK3K1Test")
        z.search_space._SPACES.pop("custom", None)


# ------------------------------------------------------------------------------------------------- zoo


def test_zoo_lists_all_published_models():
    names = z.list_models()
    assert len(names) == 15 and len(set(z.MODELS[n]["structure_file"] for n in names)) == 12
    assert z.list_models("*cifar100_*") == [f"zennet_cifar100_model_size{s}_res32" for s in ("05M", "1M", "2M")]
    assert z.model_info("zennet_imagenet1k_flops400M_res224")["name"] == "zennet_imagenet1k_flops400M_SE_res224"
    with pytest.raises(RetiaError, match="unknown ZenNet"):
        z.create_model("zennet_cifar10_model_size3M_res32")


def test_create_model_heads_and_options():
    m10 = z.create_model("zennet_cifar10_model_size05M_res32")
    m100 = z.create_model("zennet_cifar100_model_size05M_res32")
    assert (m10.head.out_features, m100.head.out_features) == (10, 100)
    assert m10.structure == m100.structure
    assert z.create_model("zennet_cifar10_model_size05M_res32", num_classes=7).head.out_features == 7
    with torch.device("meta"):
        se = z.create_model("zennet_imagenet1k_flops400M_SE_res224")
    assert se.options.use_se and any(isinstance(m, z.SqueezeExcite) for m in se.modules())


TINY = "SuperConvK3BNRELU(3,8,2,1)SuperResK1K3K1(8,16,2,8,1)SuperConvK1BNRELU(16,32,1,1)"


def _official_tiny_keys() -> dict[str, tuple[int, ...]]:
    """The state-dict names idstcv/ZenNAS gives TINY with use_se=True, written out from its PlainNet classes:
    ``module_list`` at every level, each torch layer as ``.netblock``, projections as ``proj.0/1``,
    SE as ``netblock.1`` (conv) ``.2`` (BN) ``.4`` (conv) ``.5`` (BN), the classifier ``fc_linear.netblock``."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{leaf}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["module_list.0.module_list.0.netblock.weight"] = (8, 3, 3, 3)
    bn("module_list.0.module_list.1.netblock", 8)
    for unit, c_in in ((0, 8), (2, 16)):  # [ResBlockProj, RELU, ResBlock, RELU]
        p = f"module_list.1.module_list.{unit}.module_list"
        keys[f"{p}.0.netblock.weight"] = (8, c_in, 1, 1)
        bn(f"{p}.1.netblock", 8)
        keys[f"{p}.3.netblock.weight"] = (8, 8, 3, 3)
        bn(f"{p}.4.netblock", 8)
        keys[f"{p}.6.netblock.1.weight"] = (2, 8, 1, 1)
        bn(f"{p}.6.netblock.2", 2)
        keys[f"{p}.6.netblock.4.weight"] = (8, 2, 1, 1)
        bn(f"{p}.6.netblock.5", 8)
        keys[f"{p}.7.netblock.weight"] = (16, 8, 1, 1)
        bn(f"{p}.8.netblock", 16)
    keys["module_list.1.module_list.0.proj.0.weight"] = (16, 8, 1, 1)
    keys["module_list.1.module_list.0.proj.0.bias"] = (16,)
    bn("module_list.1.module_list.0.proj.1", 16)
    keys["module_list.2.module_list.0.netblock.weight"] = (32, 16, 1, 1)
    bn("module_list.2.module_list.1.netblock", 32)
    keys["fc_linear.netblock.weight"] = (10, 32)
    keys["fc_linear.netblock.bias"] = (10,)
    return keys


def test_official_weights_load_from_pth(tmp_path):
    keys = _official_tiny_keys()
    gen = torch.Generator().manual_seed(0)
    official = {k: (torch.tensor(5) if not shape else torch.rand(shape, generator=gen) + 0.5)
                for k, shape in keys.items()}
    path = tmp_path / "best-params_rank0.pth"
    torch.save({"epoch": 3, "top1_acc": 91.5, "state_dict": {"module." + k: v for k, v in official.items()}}, path)

    model = z.build(TINY, 10, use_se=True)
    assert set(z.official_key_map(model).values()) == set(keys)
    z.load_official_weights(model, path)
    se = model.blocks[1].layers[2].body[6]
    assert torch.equal(se.reduce.weight, official["module_list.1.module_list.2.module_list.6.netblock.1.weight"])
    assert torch.equal(model.blocks[1].layers[0].proj[0].bias, official["module_list.1.module_list.0.proj.0.bias"])
    assert torch.equal(model.head.weight, official["fc_linear.netblock.weight"])
    bn_var = official["module_list.0.module_list.1.netblock.running_var"]
    assert torch.equal(model.blocks[0].layers[1].running_var, bn_var)
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()

    # a different head: everything but the classifier is loaded
    other = z.build(TINY, 4, use_se=True)
    with pytest.raises(RetiaError, match="shape"):
        z.load_official_weights(other, path)
    z.load_official_weights(other, path, skip_head=True)
    assert torch.equal(other.blocks[0].layers[0].weight, official["module_list.0.module_list.0.netblock.weight"])

    # a model without SE misses none of its own keys but the file has more: a one-line error
    with pytest.raises(RetiaError, match="unexpected") as err:
        z.load_official_weights(z.build(TINY, 10), path)
    assert "\n" not in str(err.value)


def test_create_model_with_weights_round_trip(tmp_path):
    name = "zennet_cifar10_model_size05M_res32"
    src = z.create_model(name)
    to_official = z.official_key_map(src)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + to_official[k]: v for k, v in src.state_dict().items()}}, path)
    dst = z.create_model(name, weights=path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    c100 = z.create_model(name, num_classes=100, weights=str(path))  # timm-style: the head stays fresh
    assert c100.head.out_features == 100
    assert torch.equal(c100.blocks[2].layers[0].body[0].weight, src.blocks[2].layers[0].body[0].weight)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "opts": argparse_namespace()}, bad)
    with pytest.raises(RetiaError):
        z.create_model(name, weights=bad)


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)  # not loadable with weights_only=True


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_analyze(capsys):
    tools.main(["analyze", "--arch", "zennet_cifar10_model_size1M_res32", "--json"])
    out = capsys.readouterr().out
    import json

    rec = json.loads(out)
    assert (rec["params"], rec["flops"], rec["layers"], rec["resolution"]) == (985105, 155170848.0, 18, 32)
    tools.main(["analyze", "--arch", "SuperConvK3BNRELU(3,16,1,2)", "--resolution", "32", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert "2929" in out and "2834592" in out and "layers:      2" in out


def test_cli_analyze_file_and_errors(tmp_path):
    f = tmp_path / "arch.txt"
    f.write_text(TINY + "\n")
    tools.main(["analyze", "--arch", str(f), "--resolution", "32"])
    with pytest.raises(RetiaError, match="SuperResK9K9"):
        tools.main(["analyze", "--arch", "SuperConvK3BNRELU(3,8,1,1)SuperResK9K9(8,16,1,8,1)"])
    with pytest.raises(RetiaError, match="neither"):
        tools.main(["analyze", "--arch", str(tmp_path / "missing.txt")])


def test_cli_error_exit_code(capsys):
    from retia.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(tools.main, ["analyze", "--arch", "zennet_nope_res32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_measure_latency_cpu(capsys):
    model = z.build(TINY, 10)
    r = z.measure_latency(model, batch_size=2, resolution=16, device="cpu", warmup=1, repeats=3)
    assert r["latency_per_batch_s"] > 0
    assert r["latency_per_image_s"] == pytest.approx(r["latency_per_batch_s"] / 2)
    assert r["dtype"] == "float32"
    r16 = z.measure_latency(model, batch_size=1, resolution=16, device="cpu", fp16=True, warmup=1, repeats=1)
    assert r16["dtype"] == "float32" and "CUDA" in r16["dtype_note"]
    tools.main(["latency", "--arch", TINY, "--batch-size", "2", "--resolution", "16", "--repeats", "2",
                "--warmup", "1", "--device", "cpu"])
    assert "ms/image" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_latency_cuda_fp16():
    r = z.measure_latency(z.build(TINY, 10), batch_size=4, resolution=32, device="cuda", fp16=True, repeats=3)
    assert r["dtype"] == "float16" and r["latency_per_image_s"] > 0
