"""AIO-P computational graphs: extraction on hand-built models, features, tracers, files, rendering."""
import pytest
import torch
from torch import nn

from retia.errors import RetiaError
from retia.evaluators.aiop.graph import (FEATURES, OP_TYPES, build_graph, load_graph, load_graphs, main, named_model,
                                         render, save_graph, save_graphs)
from retia.profile import count_flops, count_params


class Hand(nn.Module):
    """input -> conv3x3/2 -> bn -> relu -> dw5x5 -> pw1x1 -> add(relu, pw) -> cat(relu, add) -> GAP -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        y = self.pw(self.dw(self.drop(x)))
        z = x + y
        c = torch.cat([x, z], 1)
        return self.fc(self.pool(c).flatten(1))


HAND_OPS = ["input", "conv", "batchnorm", "relu", "depthwise_conv", "conv", "add", "concat", "global_avgpool",
            "linear", "output"]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (3, 6), (3, 7), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]


class DataDependent(Hand):
    """Python control flow on a tensor value: fx cannot trace it, the meta device cannot run it."""

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if float(x.sum()) >= 0:
            x = x * 2
        return self.fc(torch.cat([x, x], 1).mean((2, 3)))


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_hand_built_nodes_edges_and_features(method):
    g = build_graph(Hand(), (1, 3, 32, 32), method=method)
    assert g.method.startswith(method)
    assert g.ops == HAND_OPS
    assert (g.num_nodes, g.num_edges) == (11, 12)
    assert g.edges() == HAND_EDGES
    f = lambda i: dict(zip(FEATURES, g.features[i].tolist()))  # noqa: E731
    assert f(1) == dict(h_in=32, w_in=32, c_in=3, h_out=16, w_out=16, c_out=8, kernel_h=3, kernel_w=3, stride_h=2,
                        stride_w=2, groups=1, bias=0)
    assert f(4) == dict(h_in=16, w_in=16, c_in=8, h_out=16, w_out=16, c_out=8, kernel_h=5, kernel_w=5, stride_h=1,
                        stride_w=1, groups=8, bias=1)
    assert (f(5)["kernel_h"], f(5)["bias"]) == (1, 1)
    assert (f(7)["c_in"], f(7)["c_out"]) == (8, 16)               # concat of 8 + 8 channels
    assert (f(8)["h_in"], f(8)["h_out"], f(8)["c_out"], f(8)["kernel_h"]) == (16, 1, 16, 16)
    assert (f(9)["c_in"], f(9)["c_out"], f(9)["h_out"]) == (16, 10, 1)
    assert g.op_index.tolist() == [OP_TYPES.index(o) for o in HAND_OPS]
    # conv 3*8*9*16*16 + dw 8*25*16*16 + pw 8*8*16*16 + fc 16*10 (torch counts no BN / adds)
    assert g.flops == 3 * 8 * 9 * 256 + 8 * 25 * 256 + 64 * 256 + 160 == count_flops(Hand(), (1, 3, 32, 32))
    assert g.params == count_params(Hand())


def test_untraceable_model_falls_back_to_hooks_on_real_tensors():
    model = DataDependent().train()
    g = build_graph(model, (1, 3, 16, 16))
    assert g.method == "hooks/real"
    assert g.ops == ["input", "conv", "batchnorm", "relu", "mul", "concat", "global_avgpool", "linear", "output"]
    assert g.num_edges == 8 and model.training  # mode restored


def test_torchvision_resnet18_counts():
    import torchvision

    g = build_graph(torchvision.models.resnet18(), (1, 3, 224, 224))
    c = g.op_counts()
    assert c == {"input": 1, "conv": 20, "batchnorm": 20, "relu": 17, "maxpool": 1, "add": 8, "global_avgpool": 1,
                 "linear": 1, "output": 1}
    assert g.num_edges == g.num_nodes - 1 + c["add"]  # one input per op, two per residual add
    assert g.flops == 1814073344 and g.params == 11689512


def test_fx_and_hooks_agree_on_mobilenet():
    import torchvision

    m = torchvision.models.mobilenet_v3_small()
    a, b = build_graph(m, (1, 3, 64, 64), method="fx"), build_graph(m, (1, 3, 64, 64), method="hooks")
    assert a.ops == b.ops and torch.equal(a.features, b.features) and torch.equal(a.edge_index, b.edge_index)
    assert a.op_counts()["depthwise_conv"] == sum(1 for x in m.modules() if isinstance(x, nn.Conv2d) and x.groups > 1)


def test_zennas_subnet_one_node_per_conv_and_bn():
    model, shape = named_model("zennas:SuperConvK3BNRELU(3,8,1,1)SuperResK1K3K1(8,16,2,8,1)SuperConvK1BNRELU(16,64,1,1)")
    g = build_graph(model, shape)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    c = g.op_counts()
    assert c["conv"] == len(convs) and c["batchnorm"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert g.flops == count_flops(model, shape)


def test_autoformer_micro_subnet_traced_by_hooks():
    from retia.spaces.autoformer import AutoformerSpace
    from retia.evaluators.aiop.graph import AUTOFORMER_MICRO_ARCH

    model, shape = named_model("autoformer-micro")
    g = build_graph(model, shape)
    assert g.method.startswith("hooks")
    with pytest.raises(RetiaError, match="cannot build a graph of AutoformerSpace"):
        build_graph(model, shape, method="fx", profile=False)  # NNI's frozen AutoFormer does not fx-trace
    depth = AUTOFORMER_MICRO_ARCH["depth"]
    c = g.op_counts()
    assert c["linear"] == 6 * depth + 1 and c["layernorm"] == 2 * depth + 1
    assert c["softmax"] == depth and c["gelu"] == depth and c["conv"] == 1
    assert c["matmul"] == 4 * depth  # QK^T, AV and the two relative-position products
    q = g.names.index("blocks.0.attn.q")
    assert g.feature(q, "c_out") == 64 * AUTOFORMER_MICRO_ARCH["num_head_0"] and g.feature(q, "h_in") == 17
    cfg = AutoformerSpace.config("micro")
    assert g.flops == AutoformerSpace.count_flops(AUTOFORMER_MICRO_ARCH, cfg)
    assert g.params == AutoformerSpace.count_params(AUTOFORMER_MICRO_ARCH, cfg)


def test_save_load_round_trip(tmp_path):
    a = build_graph(Hand(), (1, 3, 32, 32), name="hand", meta={"arch": {"k": 3}})
    b = build_graph(DataDependent(), (1, 3, 16, 16), name="dd")
    path = save_graphs([a, b], tmp_path / "g.safetensors", meta={"family": "test"})
    assert path.exists() and path.with_suffix(".json").exists()
    back = load_graphs(path)
    assert len(back) == 2
    for x, y in zip([a, b], back):
        assert x.ops == y.ops and x.names == y.names and x.name == y.name
        assert torch.equal(x.features, y.features) and torch.equal(x.edge_index, y.edge_index)
        assert (x.flops, x.params, x.input_shape, x.method, x.meta) == (y.flops, y.params, y.input_shape, y.method,
                                                                        y.meta)
    one = save_graph(a, tmp_path / "one.safetensors")
    assert load_graph(one).edges() == HAND_EDGES
    with pytest.raises(RetiaError, match="holds 2 graphs"):
        load_graph(path)


def test_render_and_command(tmp_path, capsys):
    g = build_graph(Hand(), (1, 3, 32, 32), name="hand")
    png = render(g, tmp_path / "hand.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "z.png"
    main(["render", "--model", "zennas:SuperConvK3BNRELU(3,8,1,1)SuperConvK1BNRELU(8,16,1,1)", "-o", str(out),
          "--save", str(tmp_path / "z.safetensors")])
    assert out.stat().st_size > 1000 and "nodes" in capsys.readouterr().out
    assert load_graph(tmp_path / "z.safetensors").op_counts()["conv"] == 2


def test_bad_input_is_one_line():
    for call, pattern in [(lambda: build_graph("resnet18"), "expected a torch.nn.Module"),
                          (lambda: build_graph(Hand(), (1, 3, 0, 32)), "input_shape"),
                          (lambda: build_graph(Hand(), method="jit"), "graph method"),
                          (lambda: build_graph(Hand(), (1, 5, 32, 32)), "cannot build a graph of Hand"),
                          (lambda: named_model("resnet1800"), "expected a torchvision model name"),
                          (lambda: load_graphs("missing.safetensors"), "does not exist"),
                          (lambda: save_graphs([], "x.safetensors"), "non-empty list")]:
        with pytest.raises(RetiaError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
