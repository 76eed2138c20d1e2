"""AutoFormer space: paper parameter counts, closed-form counters, arch validation, loaders."""
import random

import pytest
import torch

from retia.errors import RetiaError
from retia.profile import count_flops, count_params
from retia.spaces.autoformer import SUBNET_KIND, SUPERNET_KIND, AutoformerSpace
from retia.weights import save_weights

MICRO = AutoformerSpace.config("micro")


def random_arch(config, rng):
    space = AutoformerSpace.from_config(config)
    return {label: rng.choice(list(m.values)) for label, m in space.simplify().items()}


@pytest.mark.parametrize("name, millions", [("autoformer-tiny", 5.87), ("autoformer-small", 22.9),
                                            ("autoformer-base", 53.7)])
def test_searched_models_have_the_papers_parameter_counts(name, millions):
    preset, arch = AutoformerSpace.searched_arch(name)
    assert round(AutoformerSpace.count_params(arch, AutoformerSpace.config(preset)) / 1e6, 2 if millions < 10 else 1) \
        == millions
    if name == "autoformer-tiny":  # building is slow for the big ones; the closed form is checked below
        assert round(count_params(AutoformerSpace.load_searched_model(name)) / 1e6, 2) == millions


def test_searched_tiny_arch_is_the_papers():
    preset, arch = AutoformerSpace.searched_arch("autoformer-tiny")
    assert preset == "tiny" and arch["embed_dim"] == 192 and arch["depth"] == 13
    assert [arch[f"num_head_{i}"] for i in range(13)] == [3] * 10 + [4, 3, 3]


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_closed_form_params_and_flops_match_the_built_module(preset):
    rng = random.Random(0)
    config = AutoformerSpace.config(preset)
    size = config.get("img_size", 224)
    for _ in range(3 if preset == "micro" else 1):
        arch = random_arch(config, rng)
        model = AutoformerSpace.build_subnet(arch, config)
        assert AutoformerSpace.count_params(arch, config) == count_params(model)
        assert AutoformerSpace.count_flops(arch, config) == count_flops(model, (1, 3, size, size))


def test_flops_by_hand_for_one_layer():
    config = dict(MICRO, search_depth=[1, 2], search_embed_dim=[48, 64])
    arch = {"embed_dim": 48, "depth": 1, "num_head_0": 1, "mlp_ratio_0": 2.0, "num_head_1": 1, "mlp_ratio_1": 2.0}
    n = 17  # 4x4 patches + cls
    expected = 16 * 48 * 3 * 64 + 48 * 10 + 4 * n * 48 * 64 + 4 * n * n * 64 + 2 * n * 48 * 96
    assert AutoformerSpace.count_flops(arch, config) == expected


@pytest.mark.parametrize("arch, message", [
    ({"embed_dim": 100, "depth": 2}, "embed_dim=100"),
    ({"embed_dim": 48, "depth": 2, "colour": 1}, "'colour'"),
    ({"embed_dim": 48, "depth": 2, "num_head_0": 1, "mlp_ratio_0": 2.0}, "missing label 'num_head_1'"),
    ([48, 2], "expected a dict"),
])
def test_bad_arch_is_a_one_line_error(arch, message):
    with pytest.raises(RetiaError, match=message) as info:
        AutoformerSpace.from_config(MICRO).complete_arch(arch)
    assert "\n" not in str(info.value)


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(RetiaError, match="'huge'"):
        AutoformerSpace.config("huge")


def test_subnet_sliced_from_supernet_file_equals_freeze_and_round_trips(tmp_path):
    torch.manual_seed(0)
    supernet = AutoformerSpace.build_supernet(MICRO)
    path = save_weights(supernet.state_dict(), tmp_path / "super.safetensors",
                        {"kind": SUPERNET_KIND, "config": MICRO})
    arch = random_arch(MICRO, random.Random(3))
    x = torch.randn(2, 3, 32, 32)
    expected = supernet.freeze(arch).eval()(x)
    sliced = AutoformerSpace.load_subnet(arch, weights=str(path)).eval()
    assert torch.allclose(sliced(x), expected, atol=1e-6)
    # the sliced subnet is a plain module with its own copy of the weights
    assert not {p.data_ptr() for p in sliced.parameters()} & {p.data_ptr() for p in supernet.parameters()}
    sub_path = save_weights(sliced.state_dict(), tmp_path / "sub.safetensors",
                            {"kind": SUBNET_KIND, "config": MICRO, "arch": arch})
    again = AutoformerSpace.load_subnet(arch, weights=str(sub_path)).eval()
    assert torch.allclose(again(x), expected, atol=1e-6)
    reloaded = AutoformerSpace.load_supernet(str(path))
    assert torch.allclose(reloaded.freeze(arch).eval()(x), expected, atol=1e-6)


def test_subnet_file_for_another_arch_is_refused(tmp_path):
    arch = random_arch(MICRO, random.Random(1))
    model = AutoformerSpace.build_subnet(arch, MICRO)
    path = save_weights(model.state_dict(), tmp_path / "sub.safetensors", {"kind": SUBNET_KIND, "config": MICRO})
    other = dict(arch, embed_dim=[e for e in MICRO["search_embed_dim"] if e != arch["embed_dim"]][0])
    with pytest.raises(RetiaError, match="has shape"):
        AutoformerSpace.load_subnet(other, weights=str(path))


def test_searched_model_with_weights_file(tmp_path):
    model = AutoformerSpace.load_searched_model("autoformer-tiny", num_labels=10)
    path = save_weights(model.state_dict(), tmp_path / "tiny.safetensors")
    preset, arch = AutoformerSpace.searched_arch("autoformer-tiny")
    loaded = AutoformerSpace.load_searched_model("autoformer-tiny", weights=str(path), num_labels=10)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(RetiaError, match="autoformer-huge"):
        AutoformerSpace.load_searched_model("autoformer-huge")


def test_supernet_sampled_path_equals_frozen_subnet():
    """Weight sharing: what RandomOneShot trains (the supernet at a sample) is what the search scores."""
    from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule

    torch.manual_seed(0)
    supernet = AutoformerSpace.build_supernet(MICRO).eval()
    rng = random.Random(5)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        arch = random_arch(MICRO, rng)
        memo = dict(arch)
        for module in supernet.modules():
            if isinstance(module, BaseSuperNetModule):
                module.resample(memo)
        assert torch.allclose(supernet(x), supernet.freeze(arch).eval()(x), atol=1e-6)
