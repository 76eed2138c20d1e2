"""Zero-shot proxies: each one against a hand calculation (numpy, float64) on a tiny network.

The proxies that re-initialise the network draw, as the original does, the Conv2d/Linear weights in module
order and then the inputs; the hand calculations replay those draws from the same seed.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nni
from retia.errors import RetiaError
from retia.evaluators import zero_shot as zs
from retia.evaluators.zero_shot import (PROXIES, ZeroShotEvaluator, flops_score, get_proxy, gradnorm_score,
                                        naswot_score, params_score, random_score, synflow_score, te_nas_score,
                                        zen_score)

R, B = 4, 6  # resolution, batch size


class TinyBN(nn.Module):
    """conv1x1(3→4) → BN → ReLU → conv1x1(4→5, no bias) → BN → ReLU → GAP → linear(5→3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4, eps=1e-3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(5, eps=1e-3)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(5, 3)

    def forward_pre_GAP(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))

    def forward(self, x):
        return self.fc(self.forward_pre_GAP(x).mean(dim=(2, 3)))


class TinyFunctionalGAP(TinyBN):
    """The same network without forward_pre_GAP: pre-GAP features are the last 4-D output of a leaf module."""

    forward_pre_GAP = None

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(TinyBN.forward_pre_GAP(self, x), 1).flatten(1))


def tiny_sequential():
    """The same network as nn.Sequential with a pooling module (pre-GAP = the input of AdaptiveAvgPool2d)."""
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                         nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5, eps=1e-3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


class Tiny(nn.Module):
    """conv1x1(3→4) → ReLU → GAP → linear(4→3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


# ---- numpy helpers --------------------------------------------------------------------------------------


def conv1x1(w, x):  # w (O, I), x (B, I, H, W)
    return np.einsum("oi,bihw->bohw", w, x)


def bn_train(h, eps=1e-3):
    """Train-mode BatchNorm (weight 1, bias 0): output and the unbiased batch variance."""
    mean = h.mean(axis=(0, 2, 3), keepdims=True)
    var = h.var(axis=(0, 2, 3), keepdims=True)
    n = h.shape[0] * h.shape[2] * h.shape[3]
    return (h - mean) / np.sqrt(var + eps), var.reshape(-1) * n / (n - 1)


def relu(h):
    return np.maximum(h, 0)


def draws(seed, *shapes):
    torch.manual_seed(seed)
    return [torch.randn(s).double().numpy() for s in shapes]


# ---- Zen-score ------------------------------------------------------------------------------------------


def zen_by_hand(seed, repeat=1, gamma=1e-2, bn_term=True):
    running = [np.ones(4), np.ones(5)]
    torch.manual_seed(seed)
    scores = []
    for _ in range(repeat):
        shapes = [(4, 3), (5, 4), (3, 5), (B, 3, R, R), (B, 3, R, R)]  # conv1, conv2, fc, x, eps
        w1, w2, _w3, x, eps = [torch.randn(s).double().numpy() for s in shapes]

        def features(inp):
            h1, v1 = bn_train(conv1x1(w1, inp))
            h2, v2 = bn_train(conv1x1(w2, relu(h1)))
            running[0] = 0.9 * running[0] + 0.1 * v1  # BatchNorm momentum 0.1
            running[1] = 0.9 * running[1] + 0.1 * v2
            return relu(h2)

        diff = np.abs(features(x) - features(x + gamma * eps)).sum(axis=(1, 2, 3)).mean()
        scores.append(np.log(diff) + bn_term * sum(np.log(np.sqrt(rv.mean())) for rv in running))
    return float(np.mean(scores))


def test_zen_score_matches_hand_calculation():
    expected = zen_by_hand(seed=3)
    assert zen_score(TinyBN(), resolution=R, batch_size=B, seed=3) == pytest.approx(expected, abs=1e-4)
    # the BN term (running variances after the two passes, starting from 1) is a real part of it
    assert abs(expected - zen_by_hand(seed=3, bn_term=False)) > 0.01


def test_zen_score_repeat_averages_and_keeps_running_stats():
    # the second repeat starts from the running variances the first one left (the original never resets them)
    info = zen_score(TinyBN(), resolution=R, batch_size=B, repeat=2, seed=5, return_info=True)
    assert info["avg_nas_score"] == pytest.approx(zen_by_hand(seed=5, repeat=2), abs=1e-4)
    assert len(info["scores"]) == 2 and info["std_nas_score"] == pytest.approx(np.std(info["scores"]))
    assert info["avg_precision"] == pytest.approx(1.96 * np.std(info["scores"]) / np.sqrt(2))


def test_zen_score_feature_protocol():
    # forward_pre_GAP, the input of an AdaptiveAvgPool2d module, and the last 4-D leaf output agree
    a = zen_score(TinyBN(), R, B, seed=11)
    assert zen_score(tiny_sequential(), R, B, seed=11) == pytest.approx(a, abs=1e-5)
    assert zen_score(TinyFunctionalGAP(), R, B, seed=11) == pytest.approx(a, abs=1e-5)
    with pytest.raises(RetiaError, match="forward_pre_GAP"):
        zen_score(nn.Sequential(nn.Flatten(), nn.Linear(3 * R * R, 2)), R, B, seed=0)


def test_zen_score_mixup_gamma_matters():
    assert zen_score(TinyBN(), R, B, mixup_gamma=1e-1, seed=3) == pytest.approx(zen_by_hand(3, gamma=1e-1), abs=1e-4)


# ---- GradNorm -------------------------------------------------------------------------------------------


def test_gradnorm_matches_hand_backprop():
    seed = 2
    torch.manual_seed(seed)
    w1, w2, x = [torch.randn(s).double().numpy() for s in [(4, 3), (3, 4), (B, 3, R, R)]]
    y = torch.randint(0, 3, (B,)).numpy()
    h = conv1x1(w1, x)
    g = relu(h).mean(axis=(2, 3))  # (B, 4)
    z = g @ w2.T  # biases are 0 after the re-init
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[y]) / B  # d mean(CE) / dz
    d_w2, d_b2 = dz.T @ g, dz.sum(0)
    dh = (dz @ w2)[:, :, None, None] / (R * R) * (h > 0)
    d_w1, d_b1 = np.einsum("bohw,bihw->oi", dh, x), dh.sum(axis=(0, 2, 3))
    expected = np.sqrt(sum((t ** 2).sum() for t in (d_w1, d_b1, d_w2, d_b2)))  # one global L2 norm
    assert gradnorm_score(Tiny(), R, B, seed=seed) == pytest.approx(expected, rel=1e-5)


# ---- NASWOT ---------------------------------------------------------------------------------------------


def test_naswot_matches_hamming_kernel_logdet():
    seed = 4
    w1, w2, _w3, x = draws(seed, (4, 3), (5, 4), (3, 5), (B, 3, R, R))
    pre1, _ = bn_train(conv1x1(w1, x))
    pre2, _ = bn_train(conv1x1(w2, relu(pre1)))
    codes = np.concatenate([(pre1 > 0).reshape(B, -1), (pre2 > 0).reshape(B, -1)], axis=1).astype(int)
    units = codes.shape[1]
    hamming = np.abs(codes[:, None, :] - codes[None, :, :]).sum(-1)
    expected = np.linalg.slogdet(units - hamming)[1]
    assert naswot_score(TinyBN(), R, B, seed=seed) == pytest.approx(expected, rel=1e-9)


def test_naswot_counts_a_wrapped_relu_once():
    class Wrapped(nn.Module):  # a PlainNet-style RELU module wrapping nn.ReLU
        def __init__(self):
            super().__init__()
            self.inner = nn.ReLU()

        def forward(self, x):
            return self.inner(x)

    Wrapped.__name__ = "RELU"
    plain, wrapped = TinyBN(), TinyBN()
    wrapped.relu1, wrapped.relu2 = Wrapped(), Wrapped()
    assert naswot_score(wrapped, R, B, seed=1) == naswot_score(plain, R, B, seed=1)


# ---- SynFlow --------------------------------------------------------------------------------------------


def test_synflow_matches_hand_calculation():
    seed = 6
    w1, w2 = (np.abs(w) for w in draws(seed, (4, 3), (3, 4)))  # |theta| after the Gaussian re-init
    hidden = w1.sum(1)  # all-ones input: every pixel of channel c is sum_i |w1[c, i]| (> 0, ReLU passes it)
    col = w2.sum(0)  # dR/dg_c for R = sum(logits)
    layer2 = (w2 * hidden[None, :]).sum(1).mean()  # |theta * dR/dtheta| summed per output unit, mean over units
    layer1 = (w1 * col[:, None]).sum(1).mean()
    expected = -(layer1 + layer2)  # the original returns -1 * score
    assert synflow_score(Tiny(), R, B, seed=seed) == pytest.approx(expected, rel=1e-12)


def test_synflow_inplace_restores_signs_and_dtype():
    model = Tiny()
    synflow_score(model, R, B, seed=0, inplace=True)
    assert model.conv.weight.dtype == torch.float32
    assert (model.conv.weight < 0).any()  # signs are back (re-initialised weights, not their absolute values)


# ---- TE-NAS (NTK condition number) ----------------------------------------------------------------------


def test_te_nas_matches_ntk_from_per_sample_jacobians():
    model = Tiny()
    rng = np.random.RandomState(0)
    with torch.no_grad():  # fixed weights: TE-NAS does not re-initialise
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.randn(*p.shape)))
    w1 = model.conv.weight.detach().double().numpy().reshape(4, 3)
    b1 = model.conv.bias.detach().double().numpy()
    w2 = model.fc.weight.detach().double().numpy()
    (x,) = draws(9, (B, 3, R, R))
    h = conv1x1(w1, x) + b1[None, :, None, None]
    g = relu(h).mean(axis=(2, 3))
    # d sum_k logits[i, k] / d w2[k, c] = g[i, c];  / d w1[c, j] = (sum_k w2[k, c]) * mean_p 1[h > 0] x[i, j]
    d_w1 = w2.sum(0)[None, :, None] * np.einsum("bchw,bjhw->bcj", (h > 0).astype(float), x) / (R * R)
    d_w2 = np.broadcast_to(g[:, None, :], (B, 3, 4))
    jac = np.concatenate([d_w1.reshape(B, -1), d_w2.reshape(B, -1)], axis=1)  # weights only, in module order
    eig = np.linalg.eigvalsh(jac @ jac.T)
    assert te_nas_score(model, R, B, seed=9) == pytest.approx(-eig[-1] / eig[0], rel=1e-3)


def test_te_nas_with_batchnorm_matches_functional_jacobian():
    # train-mode BatchNorm couples the samples; BN weights count, biases do not
    model = TinyBN()
    torch.manual_seed(9)
    x = torch.randn(B, 3, R, R)
    ref = copy.deepcopy(model).double().train()
    for m in ref.modules():  # same train-mode output, without the buffer updates a functional transform refuses
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    weights = {n: p.detach() for n, p in ref.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in ref.named_buffers()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(ref, (p, buffers), (x.double(),)).sum(1))(weights)
    rows = torch.cat([jac[n].reshape(B, -1) for n in weights if "weight" in n], dim=1)
    eig = torch.linalg.eigvalsh(rows @ rows.T)
    assert te_nas_score(model, R, B, seed=9) == pytest.approx(float(-eig[-1] / eig[0]), rel=1e-3)


# ---- FLOPs, Params, Random ------------------------------------------------------------------------------


def test_flops_and_params_of_a_plain_module():
    # torch's counter (multiply-adds of convs and linears) and the parameter count
    assert flops_score(TinyBN(), resolution=R) == 3 * 4 * R * R + 4 * 5 * R * R + 5 * 3
    assert params_score(TinyBN()) == (3 * 4 + 4) + 2 * 4 + 4 * 5 + 2 * 5 + (5 * 3 + 3)


def test_flops_and_params_use_the_models_own_counting():
    class Counted(Tiny):
        def get_FLOPs(self, resolution):
            return 7 * resolution

        def get_model_size(self):
            return 123

    assert flops_score(Counted(), resolution=9) == 63 and params_score(Counted()) == 123


def test_random_score_is_a_standard_normal_draw():
    assert random_score(None, seed=5) == np.random.RandomState(5).randn()
    np.random.seed(8)
    assert random_score(TinyBN()) == np.random.RandomState(8).randn()  # numpy's global RNG without a seed


# ---- reproducibility, registry, errors ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zen", "gradnorm", "naswot", "synflow", "te_nas"])
def test_seed_makes_proxies_reproducible_and_leaves_caller_alone(name):
    model = TinyBN()
    before = copy.deepcopy(model.state_dict())
    state = torch.get_rng_state()
    a = PROXIES[name](model, R, B, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model too
    assert PROXIES[name](model, R, B, seed=1) == a
    assert PROXIES[name](model, R, B, seed=2) != a


def test_registry_and_original_names():
    assert set(PROXIES) == {"zen", "gradnorm", "naswot", "synflow", "te_nas", "flops", "params", "random"}
    originals = {"Zen": "zen", "TE-NAS": "te_nas", "Syncflow": "synflow", "GradNorm": "gradnorm",
                 "NASWOT": "naswot", "Flops": "flops", "Params": "params", "Random": "random"}
    for original, ours in originals.items():
        assert get_proxy(original) is PROXIES[ours]


@pytest.mark.parametrize("call, match", [
    (lambda: get_proxy("zenn"), "unknown zero-shot proxy 'zenn'"),
    (lambda: ZeroShotEvaluator("fisher"), "unknown zero-shot proxy 'fisher'"),
    (lambda: ZeroShotEvaluator("zen", resolutoin=32), "bad arguments for zero-shot proxy 'zen'"),
    (lambda: zen_score(TinyBN(), resolution=0), "resolution must be an integer >= 1, got 0"),
    (lambda: naswot_score(TinyBN(), resolution=-3), "resolution must be an integer >= 1, got -3"),
    (lambda: gradnorm_score(TinyBN(), batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (lambda: zen_score(TinyBN(), repeat=0), "repeat must be an integer >= 1, got 0"),
    (lambda: zen_score(TinyBN(), mixup_gamma="big"), "mixup_gamma must be a finite number"),
    (lambda: zen_score(TinyBN(), seed=-1), "seed must be None or a non-negative integer"),
    (lambda: synflow_score(42), "expected an nn.Module or a Zen-NAS structure string, got int"),
    (lambda: zen_score("   "), "structure must be a non-empty Zen-NAS structure string"),
    (lambda: naswot_score(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())), "has no ReLU module"),
])
def test_bad_input_is_one_line_error(call, match):
    with pytest.raises(RetiaError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


# ---- NNI evaluator --------------------------------------------------------------------------------------


def test_evaluator_scores_and_reports(monkeypatch):
    reported = []
    monkeypatch.setattr(nni, "report_final_result", reported.append)
    evaluator = ZeroShotEvaluator("Zen", resolution=R, batch_size=B, seed=3)
    score = evaluator.evaluate(TinyBN())
    assert score == zen_score(TinyBN(), R, B, seed=3) and reported == [score]
    assert evaluator(TinyBN()) == score and reported == [score]  # __call__ does not report


def test_evaluator_serialises_as_proxy_and_arguments():
    evaluator = ZeroShotEvaluator("te-nas", resolution=R, batch_size=B, seed=0)
    assert evaluator.trace_kwargs == {"proxy": "te_nas", "resolution": R, "batch_size": B, "seed": 0}
    loaded = nni.load(nni.dump(evaluator))
    assert isinstance(loaded, ZeroShotEvaluator) and loaded.proxy == "te_nas" and loaded == evaluator
    assert loaded.function is te_nas_score and loaded.arguments == evaluator.arguments


def test_evaluator_in_an_nni_model_space():
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace
    from nni.nas.space import RawFormatModelSpace

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            self.conv = LayerChoice([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)], label="conv")
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))

    evaluator = ZeroShotEvaluator("naswot", resolution=R, batch_size=B, seed=0)
    space = RawFormatModelSpace.from_model(Space(), evaluator)
    frozen = space.freeze({"conv": 1})
    with evaluator.mock_runtime(frozen):
        frozen.execute()
    assert frozen.metrics.final == naswot_score(frozen.executable_model(), R, B, seed=0)


# ---- structure strings (retia.spaces.zennas) ------------------------------------------------------------

STRUCTURE = "SuperConvK1BNRELU(3,4,1,1)SuperResK3K3(4,4,1,2,1)"


def _zennas():
    return pytest.importorskip("retia.spaces.zennas", reason="retia.spaces.zennas (structure strings) not available")


def test_structure_string_builds_without_residual_links():
    zennas = _zennas()
    with_links = zen_score(zennas.build(STRUCTURE, 100), 8, 4, seed=0)
    without = zen_score(zennas.build(STRUCTURE, 100, no_reslink=True), 8, 4, seed=0)
    assert zen_score(STRUCTURE, 8, 4, seed=0) == without != with_links
    built = zennas.build(STRUCTURE, 100, no_reslink=True)
    assert gradnorm_score(STRUCTURE, 8, 4, seed=0) == gradnorm_score(built, 8, 4, seed=0)
    # TE-NAS keeps the default init: a seeded string builds the same network every time
    assert te_nas_score(STRUCTURE, 8, 4, seed=0) == te_nas_score(STRUCTURE, 8, 4, seed=0)


def test_structure_string_counts_like_the_original():
    _zennas()
    # no residual links, resolution 4, 10 classes: convs 3*4 + 2 * 4*2*9 per pixel, BN 4 + 2 + 4 per pixel
    # (the original counts BN as C multiply-adds per pixel and C parameters), classifier 4*10 (+1 for its bias)
    assert flops_score(STRUCTURE, resolution=4, num_classes=10) == (12 + 4 + 72 + 2 + 72 + 4) * 16 + 40
    assert params_score(STRUCTURE, num_classes=10) == 12 + 4 + 72 + 2 + 72 + 4 + 41
