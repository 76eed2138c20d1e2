"""Official microsoft/Cream AutoFormer checkpoints → retia weights (convert/autoformer.py).

The checkpoints are random state dicts in the official layout, saved the way Cream's ``supernet_train.py`` saves
them (``{'model', 'optimizer', 'args': argparse.Namespace, ...}``). The converted models are compared with
``official_forward`` below: an independent, plain-tensor implementation of the official forward of a sampled
subnet (qkv rows regrouped with stride 3, contiguous qkv bias, scale ``(64h // h) ** -0.5``, relative-position
tables indexed by clamped row/column distance with row 0 for the cls token, prefix-sliced layer norms).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retia.convert import autoformer as conv
from retia.errors import RetiaError
from retia.spaces.autoformer import AutoformerSpace
from retia.weights import load_meta

ROOT = Path(__file__).resolve().parents[1]
# A small official supernet: super embed 128 with 2 heads of 64, mlp ratio 4, 3 layers, 32x32 images, 8x8 patches.
SUPER = dict(embed=128, heads=2, mlp=4.0, depth=3, img=32, patch=8, classes=10)
# The retia space it is converted into: its largest embed dim (96) is below the official 128, so it is sliced.
CONFIG = dict(search_embed_dim=[64, 96], search_mlp_ratio=[2.0, 3.0], search_num_heads=[1, 2],
              search_depth=[2, 3], img_size=32, patch_size=8, num_labels=10, drop_path_rate=0.0)
TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# official layout and forward (written from the official semantics, no retia / NNI code)
def official_state(embed=128, heads=2, mlp=4.0, depth=3, img=32, patch=8, classes=10, max_rel=14, seed=0,
                   post_norm=False):
    """Random tensors with the official names and shapes; scaled so that every term moves the output."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    hidden, side = int(embed * mlp), img // patch
    table = embed // heads
    sd = {
        "patch_embed_super.proj.weight": rnd(embed, 3, patch, patch, std=1 / math.sqrt(3 * patch * patch)),
        "patch_embed_super.proj.bias": rnd(embed, std=0.1),
        "cls_token": rnd(1, 1, embed, std=0.5),
        "pos_embed": rnd(1, side * side + 1, embed, std=0.5),
        "head.weight": rnd(classes, embed, std=1 / math.sqrt(embed)),
        "head.bias": rnd(classes, std=0.1),
    }
    if not post_norm:
        sd["norm.weight"], sd["norm.bias"] = 1 + rnd(embed, std=0.2), rnd(embed, std=0.2)
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "attn.qkv.weight"] = rnd(3 * embed, embed, std=1.5 / math.sqrt(embed))
        sd[p + "attn.qkv.bias"] = rnd(3 * embed, std=0.5)
        sd[p + "attn.proj.weight"] = rnd(embed, embed, std=1 / math.sqrt(embed))
        sd[p + "attn.proj.bias"] = rnd(embed, std=0.1)
        for rel in ("k", "v"):
            for part in ("v", "h"):
                sd[f"{p}attn.rel_pos_embed_{rel}.embeddings_table_{part}"] = rnd(2 * max_rel + 2, table, std=0.5)
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = 1 + rnd(embed, std=0.2), rnd(embed, std=0.2)
        sd[p + "fc1.weight"] = rnd(hidden, embed, std=1 / math.sqrt(embed))
        sd[p + "fc1.bias"] = rnd(hidden, std=0.1)
        sd[p + "fc2.weight"] = rnd(embed, hidden, std=1 / math.sqrt(hidden))
        sd[p + "fc2.bias"] = rnd(embed, std=0.1)
    return sd


def save_official(path, sd, **args):
    """Save like Cream's supernet_train.py: model, optimizer state, the argparse namespace, epoch."""
    ns = argparse.Namespace(**{"gp": True, "change_qkv": True, "relative_position": True, "max_relative_position": 14,
                               "input_size": 32, "patch_size": 8, "post_norm": False, "no_abs_pos": False,
                               "cfg": "./experiments/supernet/supernet-T.yaml", "lr": 5e-4, **args})
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "params": [0]}]}
    torch.save({"model": sd, "optimizer": optimizer, "epoch": 3, "args": ns}, path)
    return path


@functools.lru_cache(maxsize=None)
def _relative_index(side, reach, vertical):
    """(N, N) table rows: 0 for the cls token, clamp(distance, -reach, reach) + reach + 1 between patches."""
    n = side * side + 1
    index = torch.zeros(n, n, dtype=torch.long)
    for query in range(1, n):
        for key in range(1, n):
            qa, ka = divmod(query - 1, side), divmod(key - 1, side)
            distance = ka[0] - qa[0] if vertical else ka[1] - qa[1]
            index[query, key] = max(-reach, min(reach, distance)) + reach + 1
    return index


def official_forward(sd, x, arch, patch=8, gp=True, pre_norm=True):
    """The official sampled-subnet forward of ``arch`` (NNI labels) from the official state dict ``sd``."""
    e, depth = arch["embed_dim"], arch["depth"]
    batch, side = x.shape[0], x.shape[-1] // patch
    t = F.conv2d(x, sd["patch_embed_super.proj.weight"][:e], sd["patch_embed_super.proj.bias"][:e], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"][..., :e].expand(batch, 1, e), t], dim=1) + sd["pos_embed"][..., :e]
    n = t.shape[1]

    def norm(name, v):
        return F.layer_norm(v, (e,), sd[name + ".weight"][:e], sd[name + ".bias"][:e], eps=1e-5)

    for i in range(depth):
        p, h = f"blocks.{i}.", arch[f"num_head_{i}"]
        width, hidden = 64 * h, int(e * arch[f"mlp_ratio_{i}"])
        residual = t
        y = norm(p + "attn_layer_norm", t) if pre_norm else t
        rows = [3 * j + part for part in range(3) for j in range(width)]  # q rows 0,3,..; k 1,4,..; v 2,5,..
        out = y @ sd[p + "attn.qkv.weight"][rows, :e].T + sd[p + "attn.qkv.bias"][:3 * width]
        q, k, v = (z.reshape(batch, n, h, 64) for z in out.split(width, dim=-1))
        scale = (width // h) ** -0.5

        def rel(which):
            tv, th = (sd[f"{p}attn.rel_pos_embed_{which}.embeddings_table_{a}"][:, :64] for a in ("v", "h"))
            reach = (tv.shape[0] - 2) // 2
            return tv[_relative_index(side, reach, True)] + th[_relative_index(side, reach, False)]

        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        logits = logits + torch.einsum("bqhd,qkd->bhqk", q, rel("k")) * scale
        weights = logits.softmax(dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", weights, v) + torch.einsum("bhqk,qkd->bqhd", weights, rel("v"))
        o = o.reshape(batch, n, width) @ sd[p + "attn.proj.weight"][:e, :width].T + sd[p + "attn.proj.bias"][:e]
        t = residual + o
        t = t if pre_norm else norm(p + "attn_layer_norm", t)
        residual = t
        y = norm(p + "ffn_layer_norm", t) if pre_norm else t
        y = F.gelu(y @ sd[p + "fc1.weight"][:hidden, :e].T + sd[p + "fc1.bias"][:hidden])
        y = y @ sd[p + "fc2.weight"][:e, :hidden].T + sd[p + "fc2.bias"][:e]
        t = residual + y
        t = t if pre_norm else norm(p + "ffn_layer_norm", t)
    if pre_norm:
        t = norm("norm", t)
    feature = t[:, 1:].mean(dim=1) if gp else t[:, 0]
    return feature @ sd["head.weight"][:, :e].T + sd["head.bias"]


def make_arch(embed, heads, ratios):
    arch = {"embed_dim": embed, "depth": len(heads)}
    for i, (h, r) in enumerate(zip(heads, ratios)):
        arch[f"num_head_{i}"], arch[f"mlp_ratio_{i}"] = h, r
    return arch


def run(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = official_state(**SUPER)
    return sd, save_official(tmp_path_factory.mktemp("official") / "supernet.pth", sd)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# subnets: exact
ARCHS = [make_arch(96, [1, 2, 1], [2.0, 3.0, 2.0]), make_arch(64, [2, 1], [3.0, 2.0]),
         make_arch(96, [2, 2, 2], [3.0, 3.0, 2.0])]


@pytest.mark.parametrize("arch", ARCHS, ids=["e96-h121", "e64-h21", "e96-h222"])
def test_subnet_reproduces_official_forward(official, images, tmp_path, arch):
    sd, src = official
    result = conv.convert(src, tmp_path / "sub.safetensors", config=CONFIG, subnet=arch)
    model = AutoformerSpace.load_subnet(arch, weights=str(result.path))
    expected = official_forward(sd, images, arch)
    assert expected.abs().max() > 0.5 and expected.std() > 0.1  # outputs are not trivially small
    got = run(model, images)
    assert got.shape == (2, 10)
    assert torch.allclose(got, expected, **TOL), (got - expected).abs().max()
    meta = load_meta(result.path)
    assert meta["kind"] == "autoformer-subnet" and meta["arch"]["depth"] == arch["depth"]
    assert meta["config"]["global_pooling"] is True and meta["config"]["num_labels"] == 10


def test_reference_is_discriminative(official, images, tmp_path):
    """The comparison can fail: q/k/v taken as contiguous rows, or the wrong scale, change the output."""
    sd, src = official
    arch = ARCHS[0]
    model = AutoformerSpace.load_subnet(arch, weights=str(conv.convert(src, tmp_path / "s.safetensors",
                                                                      config=CONFIG, subnet=arch).path))
    expected = official_forward(sd, images, arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qkv, width = sd["blocks.1.attn.qkv.weight"], 128
    naive = dict(state)
    for part, name in enumerate("qkv"):  # a converter that ignores the stride-3 regrouping
        naive[f"blocks.1.attn.{name}.weight"] = qkv[part * width:(part + 1) * width, :96]
    model.load_state_dict(naive)
    assert not torch.allclose(run(model, images), expected, **TOL)
    model.load_state_dict(state)
    model.blocks[1].attn.scale = (96 // 2) ** -0.5  # the scale without change_qkv: (e // h) ** -0.5
    assert not torch.allclose(run(model, images), expected, **TOL)
    model.blocks[1].attn.scale = 64 ** -0.5
    assert torch.allclose(run(model, images), expected, **TOL)


@pytest.mark.parametrize("max_rel", [2, 3])
def test_relative_tables_reindexed_for_any_reach(tmp_path, images, max_rel):
    """Official tables with max_relative_position 2 (clamped) or 3 (= side - 1) rather than NNI's side (4)."""
    sd = official_state(**SUPER, max_rel=max_rel, seed=3)
    src = save_official(tmp_path / "o.pth", sd, max_relative_position=max_rel)
    arch = ARCHS[0]
    model = AutoformerSpace.load_subnet(arch, str(conv.convert(src, tmp_path / "s.safetensors", config=CONFIG,
                                                               subnet=arch).path))
    assert torch.allclose(run(model, images), official_forward(sd, images, arch), **TOL)


def test_cls_pooling_and_post_norm_follow_the_checkpoint(tmp_path, images):
    sd = official_state(**SUPER, seed=4, post_norm=True)
    src = save_official(tmp_path / "o.pth", sd, gp=False, post_norm=True)
    arch = ARCHS[1]
    result = conv.convert(src, tmp_path / "s.safetensors", config=CONFIG, subnet=arch)
    assert result.meta["config"]["global_pooling"] is False and result.meta["config"]["pre_norm"] is False
    model = AutoformerSpace.load_subnet(arch, str(result.path))
    expected = official_forward(sd, images, arch, gp=False, pre_norm=False)
    assert torch.allclose(run(model, images), expected, **TOL)
    assert not torch.allclose(expected, official_forward(sd, images, arch, gp=True, pre_norm=False), **TOL)
    forced = conv.convert(src, tmp_path / "m.safetensors", config=CONFIG, subnet=arch, pooling="mean")
    assert forced.meta["config"]["global_pooling"] is True


def test_bare_state_dict_and_arch_json(official, images, tmp_path):
    sd, _ = official
    src = tmp_path / "bare.pth"
    torch.save(sd, src)  # no args: mean pooling (the released runs' --gp)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(ARCHS[1]))
    config_file = tmp_path / "space.json"
    config_file.write_text(json.dumps(CONFIG))
    result = conv.main(["--config", str(config_file), "--src", str(src), "--dst", str(tmp_path / "s.safetensors"),
                        "--subnet", str(arch_file)])
    model = AutoformerSpace.load_subnet(ARCHS[1], str(result.path))
    assert torch.allclose(run(model, images), official_forward(sd, images, ARCHS[1]), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# supernet: exact where every layer has the most heads, off by the v bias elsewhere
@pytest.fixture(scope="module")
def supernet_file(official, tmp_path_factory):
    _, src = official
    return conv.convert(src, tmp_path_factory.mktemp("super") / "super.safetensors", config=CONFIG)


def test_supernet_file_loads_and_is_exact_with_max_heads(official, images, supernet_file):
    sd, _ = official
    meta = load_meta(supernet_file.path)
    assert meta["kind"] == "autoformer-supernet" and meta["exact_num_heads"] == 2
    assert meta["converted_from"]["super_embed_dim"] == 128
    supernet = AutoformerSpace.load_supernet(str(supernet_file.path))
    assert "blocks.blocks.0.attn.q.weight" in supernet.state_dict()
    for arch in (ARCHS[2], make_arch(64, [2, 2], [2.0, 3.0])):
        model = AutoformerSpace.load_subnet(arch, weights=str(supernet_file.path))
        assert torch.allclose(run(model, images), official_forward(sd, images, arch), **TOL)


def test_supernet_with_fewer_heads_differs_only_by_the_v_bias(official, images, supernet_file, tmp_path):
    sd, _ = official
    arch = ARCHS[0]  # layers 0 and 2 have 1 head of a possible 2
    model = AutoformerSpace.load_subnet(arch, weights=str(supernet_file.path))
    assert not torch.allclose(run(model, images), official_forward(sd, images, arch), atol=1e-3)
    # The converted k/v biases of a 1-head layer are official rows 128:192 / 256:320 where the official 1-head
    # subnet uses 64:128 / 128:192. Zero the official v biases of both head counts (128:192 and 256:384): the
    # k-bias mismatch remains, and softmax cancels it, so the outputs agree.
    patched = {k: v.clone() for k, v in sd.items()}
    for i in range(3):
        patched[f"blocks.{i}.attn.qkv.bias"][128:192] = 0
        patched[f"blocks.{i}.attn.qkv.bias"][256:384] = 0
    src = save_official(tmp_path / "vzero.pth", patched)
    result = conv.convert(src, tmp_path / "super.safetensors", config=CONFIG)
    model = AutoformerSpace.load_subnet(arch, weights=str(result.path))
    assert torch.allclose(run(model, images), official_forward(patched, images, arch), **TOL)
    k_bias = result.state["blocks.blocks.0.attn.k.bias"][:64]
    assert not torch.equal(k_bias, patched["blocks.0.attn.qkv.bias"][64:128])  # the k bias did differ


# ---------------------------------------------------------------------------------------------------------------
# the paper preset: AutoFormer-T from a tiny-shaped official supernet (super embed 256 > the space's 240)
def test_searched_tiny_subnet_via_cli(tmp_path):
    sd = official_state(embed=256, heads=4, mlp=4.0, depth=14, img=224, patch=16, classes=1000, seed=5)
    src = save_official(tmp_path / "supernet-tiny.pth", sd, input_size=224, patch_size=16)
    dst = tmp_path / "autoformer-tiny.safetensors"
    result = conv.main(["--name", "tiny", "--src", str(src), "--dst", str(dst), "--subnet", "autoformer-tiny"])
    _, arch = AutoformerSpace.searched_arch("autoformer-tiny")
    model = AutoformerSpace.load_subnet(arch, weights=str(dst))
    assert sum(p.numel() for p in model.parameters()) == AutoformerSpace.count_params(arch, result.meta["config"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(run(model, x), official_forward(sd, x, arch, patch=16), **TOL)
    assert result.meta["config"]["search_embed_dim"] == [192, 216, 240] and result.meta["arch"]["embed_dim"] == 192


# ---------------------------------------------------------------------------------------------------------------
# bad input: one-line errors
class _OpensAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_loader_refuses_other_classes_without_running_them(official, tmp_path, zip_format):
    sd, _ = official
    marker = tmp_path / "created-by-unpickling"
    src = tmp_path / "evil.pth"
    torch.save({"model": sd, "args": _OpensAFile(str(marker))}, src, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(RetiaError) as err:
        conv.load_official(src)
    message = str(err.value)
    assert "\n" not in message and "io.open" in message and str(src) in message
    assert not marker.exists()


def test_loader_names_a_refused_class(official, tmp_path):
    import fractions

    sd, _ = official
    src = tmp_path / "frac.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=fractions.Fraction(1, 3))}, src)
    with pytest.raises(RetiaError, match=r"fractions\.Fraction"):
        conv.load_official(src)


def _cli_error(capsys, argv):
    from retia.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(conv.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors(official, tmp_path, capsys):
    _, src = official
    dst = str(tmp_path / "o.safetensors")
    assert "'huge'" in _cli_error(capsys, ["--name", "huge", "--src", str(src), "--dst", dst])
    missing = str(tmp_path / "nope.pth")
    assert missing in _cli_error(capsys, ["--name", "tiny", "--src", missing, "--dst", dst])
    assert "autoformer-small is a small model" in _cli_error(
        capsys, ["--name", "tiny", "--src", str(src), "--dst", dst, "--subnet", "autoformer-small"])
    assert "nope.json" in _cli_error(capsys, ["--name", "tiny", "--src", str(src), "--dst", dst,
                                              "--subnet", str(tmp_path / "nope.json")])
    # presets / configs that do not fit the small official file
    assert "preset micro" in _cli_error(capsys, ["--name", "micro", "--src", str(src), "--dst", dst])
    config_file = tmp_path / "space.json"
    config_file.write_text(json.dumps({**CONFIG, "img_size": 64}))
    assert "img_size=64" in _cli_error(capsys, ["--config", str(config_file), "--src", str(src), "--dst", dst])
    assert "embed dim up to 240" in _cli_error(
        capsys, ["--name", "tiny", "--src", str(src), "--dst", dst, "--pooling", "mean"])
    with pytest.raises(SystemExit):  # argparse: --src is required
        conv.main(["--name", "tiny", "--dst", dst])
    assert not Path(dst).exists()


def test_arch_that_does_not_fit_the_space(official, tmp_path):
    _, src = official
    for arch, needle in ((make_arch(96, [3, 1, 1], [2.0, 2.0, 2.0]), "num_head_0=3"),
                         (make_arch(128, [1, 1], [2.0, 2.0]), "embed_dim=128"),
                         ({"embed_dim": 64, "depth": 2, "num_head_0": 1}, "missing label"),
                         ({**make_arch(64, [1, 1], [2.0, 2.0]), "kernel_0": 3}, "'kernel_0'")):
        with pytest.raises(RetiaError, match=needle):
            conv.convert(src, tmp_path / "s.safetensors", config=CONFIG, subnet=arch)
    wide = {**CONFIG, "search_embed_dim": [64, 160]}
    with pytest.raises(RetiaError, match="embed dim up to 160, the official supernet has 128"):
        conv.convert(src, tmp_path / "s.safetensors", config=wide)
    heads = {**CONFIG, "search_num_heads": [1, 3]}
    with pytest.raises(RetiaError, match="3 heads of 64"):
        conv.convert(src, tmp_path / "s.safetensors", config=heads)


def test_refuses_non_autoformer_and_non_change_qkv_files(official, tmp_path):
    sd, _ = official
    other = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(RetiaError, match="not an official AutoFormer checkpoint"):
        conv.convert(other, tmp_path / "s.safetensors", config=CONFIG)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(RetiaError, match="cannot be read as a torch file") as err:
        conv.load_official(text)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    plain = save_official(tmp_path / "plain.pth", sd, change_qkv=False)
    with pytest.raises(RetiaError, match="change_qkv"):
        conv.convert(plain, tmp_path / "s.safetensors", config=CONFIG)


@pytest.mark.slow
def test_runs_as_a_script(official, tmp_path):
    _, src = official
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(ARCHS[1]))
    config_file = tmp_path / "space.json"
    config_file.write_text(json.dumps(CONFIG))
    dst = tmp_path / "s.safetensors"
    done = subprocess.run([sys.executable, "convert/autoformer.py", "--config", str(config_file), "--src", str(src),
                           "--dst", str(dst), "--subnet", str(arch_file)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert dst.exists() and "autoformer-subnet" in done.stdout
    bad = subprocess.run([sys.executable, "convert/autoformer.py", "--name", "huge", "--src", str(src), "--dst",
                          str(dst)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "huge" in bad.stderr
