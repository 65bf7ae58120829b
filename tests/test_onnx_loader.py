"""The onnx loader: torch exports give the torch tracer's graph; hand-built graphs cover every route."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnx
import torch
nn = torch.nn

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hpa  # noqa: E402
from conftest import assert_bad_input  # noqa: E402
from hpa.errors import LoadError, OptionError  # noqa: E402
from test_onnx_conformance import run_layer  # noqa: E402

# -- torch exports -----------------------------------------------------------------------------------


def export(model, input_size, path, *, keep_bn=True, dynamo=False, opset=None):
    """Export in eval mode with BatchNorm kept as nodes (no constant folding) or fused into the convs.

    (A TrainingMode.TRAINING export also keeps BatchNorm, but runs one training step first, so
    it writes updated running statistics and keeps stochastic-depth noise.)
    """
    model.eval()
    x = torch.randn(1, *input_size)
    kwargs = {"dynamo": dynamo, "do_constant_folding": not keep_bn}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def randomize_bn(model, seed=0):
    """Non-trivial running statistics and affine terms, some gammas negative."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def cosines(layer):
    w = np.asarray(layer.weight, np.float64)
    if layer.transposed:
        g = layer.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(0, 2, 1, 3)
    w = w.reshape(layer.out_channels, -1)
    return w.sum(1) / (np.linalg.norm(w, axis=1) * np.sqrt(w.shape[1]))


ATTRS = ("kind", "stride", "padding", "dilation", "groups", "output_padding", "activation",
         "input_shape", "output_shape")


def assert_same_graph(got, want, *, names=True, bn=True, via=True):
    assert [l.kind for l in got] == [l.kind for l in want]
    for a, b in zip(got, want):
        for attr in ATTRS:
            assert getattr(a, attr) == getattr(b, attr), (b.name, attr, getattr(a, attr), getattr(b, attr))
        assert a.weight.shape == b.weight.shape
        assert a.activation_params == pytest.approx(b.activation_params)
        if names:
            assert a.name == b.name
            assert a.predecessors == b.predecessors
        else:
            assert len(a.predecessors) == len(b.predecessors)
        if bn:
            assert a.bn_folded == b.bn_folded
        if via and names:
            assert a.via == b.via, (b.name, a.via, b.via)
        np.testing.assert_allclose(cosines(a), cosines(b), atol=1e-6, rtol=0)
        assert (a.bias is None) == (b.bias is None)
        if a.bias is not None:
            np.testing.assert_allclose(a.bias, b.bias, rtol=1e-5, atol=1e-5)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class Mixed(nn.Module):
    """BN, grouped, depthwise with multiplier, dilation, asymmetric padding, a residual add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8)
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.asym = nn.Conv2d(16, 8, (2, 3), stride=(1, 2))
        self.c5 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.grouped(x)) + x)
        y = nn.functional.leaky_relu(self.depthwise(y), 0.2)
        y = torch.relu(self.asym(self.pad(y)))
        return self.c5(y)


class Dims(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
        self.a = conv(2, 4, 3, padding=1, stride=2)
        self.bn = bn(4)
        self.b = conv(4, 6, 3, dilation=2, groups=2)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.sigmoid(self.bn(self.up(torch.relu(self.c(x)))))


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        acts = [nn.ReLU(), nn.LeakyReLU(0.1), nn.PReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish(),
                nn.GELU(), nn.Tanh(), nn.Sigmoid(), nn.Identity()]
        self.convs = nn.ModuleList(nn.Conv2d(4 if i else 3, 4, 3, padding=1) for i in range(len(acts)))
        self.acts = nn.ModuleList(acts)

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return x


MODELS = {
    "plain": (Plain, (3, 16, 16)),
    "mixed": (Mixed, (3, 12, 12)),
    "conv1d": (lambda: Dims(1), (2, 20)),
    "conv3d": (lambda: Dims(3), (2, 9, 9, 9)),
    "transposed": (Transposed, (3, 8, 8)),
    "activations": (Activations, (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_with_batchnorm_nodes_matches_torch_tracer(name, tmp_path):
    torch.manual_seed(0)
    factory, size = MODELS[name]
    model = randomize_bn(factory())
    path = export(model, size, tmp_path / f"{name}.onnx", keep_bn=True)
    got = hpa.load(str(path))
    want = hpa.load(model, input_size=size)
    assert_same_graph(got, want)
    assert got.input_shape == tuple(size)
    assert got.skipped == []


@pytest.mark.parametrize("name", ["plain", "mixed", "conv1d", "transposed"])
def test_fused_export_gives_the_same_cosines(name, tmp_path):
    torch.manual_seed(0)
    factory, size = MODELS[name]
    model = randomize_bn(factory())
    path = export(model, size, tmp_path / f"{name}.onnx", keep_bn=False)
    got = hpa.load(str(path))
    want = hpa.load(model, input_size=size)
    # A fused export cannot know that BatchNorm was there, and names its fused weights itself.
    assert_same_graph(got, want, names=False, bn=False)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("keep_bn", [True, False])
def test_torchvision_exports_match_torch_tracer(arch, keep_bn, tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None))
    path = export(model, (3, 64, 64), tmp_path / f"{arch}.onnx", keep_bn=keep_bn)
    assert_same_graph(hpa.load(str(path)), hpa.load(model, input_size=(3, 64, 64)),
                      names=keep_bn, bn=keep_bn)


def test_no_fold_bn_keeps_raw_weights(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(Mixed())
    path = export(model, (3, 12, 12), tmp_path / "m.onnx", keep_bn=True)
    got = hpa.load(str(path), fold_bn=False)
    want = hpa.load(model, input_size=(3, 12, 12), fold_bn=False)
    assert_same_graph(got, want)
    assert not any(layer.bn_folded for layer in got)


def test_decomposed_gelu_and_opset_11_clip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    path = export(model, (3, 10, 10), tmp_path / "gelu.onnx", opset=13)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Erf" in ops and "Gelu" not in ops  # the exporter decomposed it
    got = hpa.load(str(path))
    assert [l.activation for l in got] == ["gelu", "relu6", "none"]
    assert_same_graph(got, hpa.load(model, input_size=(3, 10, 10)), via=False)


def test_dynamo_export_matches_torch_tracer(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(Plain())
    # No skip: the dynamo exporter ships with every torch that accepts export(dynamo=...), which
    # export() above always passes, and onnxscript (its other need) is a hard dependency.
    path = export(model, (3, 16, 16), tmp_path / "dyn.onnx", keep_bn=False, dynamo=True)
    assert_same_graph(hpa.load(str(path)), hpa.load(model, input_size=(3, 16, 16)), bn=False, via=False)


def test_onnx_prefix_and_symbolic_input_size(tmp_path):
    torch.manual_seed(0)
    model = Plain().eval()
    path = tmp_path / "dyn_axes.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    graph = hpa.load(f"onnx:{path}")
    assert graph.layers[0].input_shape is None and graph.input_shape is None
    assert "symbolic" in " ".join(graph.source["notes"])
    sized = hpa.load(str(path), input_size=(3, 32, 32))
    assert sized.input_shape == (3, 32, 32)
    assert sized.layers[0].output_shape == (8, 32, 32)
    assert sized.layers[1].output_shape == (16, 7, 7)
    with pytest.raises(OptionError, match="dimensions"):
        hpa.load(str(path), input_size=(3, 32))


# -- hand-built graphs ----------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def make_model(nodes, initializers=(), *, input_shape=(1, 3, 8, 8), output="y", opset=17, inputs=None):
    graph = helper.make_graph(
        nodes, "test",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in dict(initializers).items()])
    # IR 10: what the installed onnxruntime reads (onnx's own default may be newer)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


def const_node(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


W = rand(4, 3, 3, 3)
B = rand(4)


def test_weight_from_constant_node(tmp_path):
    nodes = [const_node("w", W), const_node("b", B), helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    layer = hpa.load(save(make_model(nodes), tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, W)
    np.testing.assert_array_equal(layer.bias, B)
    assert layer.name == "conv"


def test_weight_through_identity_cast_reshape_transpose(tmp_path):
    stored = W.transpose(1, 0, 2, 3).reshape(3, 36).astype(np.float16)  # (Cin, Cout*k*k), half precision
    nodes = [
        helper.make_node("Identity", ["stored"], ["a"]),
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["b", "shape"], ["c"]),
        helper.make_node("Transpose", ["c"], ["w"], perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["x", "w"], ["y"]),
    ]
    inits = {"stored": stored, "shape": np.array([3, 4, 3, 3], np.int64)}
    layer = hpa.load(save(make_model(nodes, inits), tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, W.astype(np.float16).astype(np.float32))
    assert layer.bias is None
    assert layer.name == "y"  # no node name, no torch-style initializer: the output name


def test_weight_from_constant_of_shape_subgraph(tmp_path):
    nodes = [
        helper.make_node("Shape", ["like"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    layer = hpa.load(save(make_model(nodes, {"like": np.zeros((4, 3, 3, 3), np.float32)}), tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, np.full((4, 3, 3, 3), 0.5, np.float32))


def test_dequantize_linear_per_channel_weights(tmp_path):
    q = RNG.integers(-100, 100, size=(4, 3, 3, 3)).astype(np.int8)
    scale = np.array([0.1, 0.2, 0.05, 1.0], np.float32)
    zero = np.array([0, 1, -2, 3], np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["conv1.weight_q", "scale", "zero"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w", "b"], ["y"])]
    inits = {"conv1.weight_q": q, "scale": scale, "zero": zero, "b": B}
    layer = hpa.load(save(make_model(nodes, inits), tmp_path / "m.onnx")).layers[0]
    expected = (q.astype(np.float32) - zero.reshape(4, 1, 1, 1)) * scale.reshape(4, 1, 1, 1)
    np.testing.assert_allclose(layer.weight, expected)
    assert layer.name == "y"


def test_large_initializers_are_views_of_the_file(tmp_path):
    big = rand(64, 32, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "features.0.weight"], ["y"], name="/features/Conv")]
    model = make_model(nodes, {"features.0.weight": big}, input_shape=(1, 32, 8, 8))
    layer = hpa.load(save(model, tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, big)
    assert layer.name == "features.0"  # a torch-style initializer names the layer
    assert not layer.weight.flags.owndata  # mapped from the file, not copied


def test_large_constant_node_is_a_view_of_the_file(tmp_path):
    big = rand(64, 3, 3, 3)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(big)),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    layer = hpa.load(save(make_model(nodes), tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, big)
    assert not layer.weight.flags.owndata


def test_external_data(tmp_path):
    big = rand(64, 32, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, {"w": big, "b": rand(64)}, input_shape=(1, 32, 8, 8))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    graph = hpa.load(str(path))
    np.testing.assert_array_equal(graph.layers[0].weight, big)
    assert graph.layers[0].activation == "relu"
    assert graph.source["external_data"] == [str((tmp_path / "ext.weights").resolve())]
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(LoadError, match="external data file 'ext.weights'.*missing"):
        hpa.load(str(path))


def _conv_then(act_nodes, opset=17, inits=()):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), *act_nodes,
             helper.make_node("Conv", ["a", "w2"], ["y"], name="next")]
    return make_model(nodes, {"w": W, "b": B, "w2": rand(2, 4, 1, 1), **dict(inits)}, opset=opset)


ACTIVATION_CASES = {
    "relu": ([helper.make_node("Relu", ["c"], ["a"])], {}, 17, ("relu", {})),
    "leaky_relu": ([helper.make_node("LeakyRelu", ["c"], ["a"], alpha=0.3)], {}, 17,
                   ("leaky_relu", {"negative_slope": 0.3})),
    "prelu": ([helper.make_node("PRelu", ["c", "slope"], ["a"])], {"slope": rand(4, 1, 1)}, 17, ("prelu", {})),
    "relu6_inputs": ([helper.make_node("Clip", ["c", "lo", "hi"], ["a"])],
                     {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, 17, ("relu6", {})),
    "relu6_attributes": ([helper.make_node("Clip", ["c"], ["a"], min=0.0, max=6.0)], {}, 6, ("relu6", {})),
    "clip_min_only": ([helper.make_node("Clip", ["c", "lo"], ["a"])], {"lo": np.array(0, np.float32)}, 17,
                      ("relu", {})),
    "silu": ([helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["a"])], {}, 17,
             ("silu", {})),
    "hardswish": ([helper.make_node("HardSwish", ["c"], ["a"])], {}, 17, ("hardswish", {})),
    "hardsigmoid_mul": ([helper.make_node("HardSigmoid", ["c"], ["s"], alpha=1 / 6, beta=0.5),
                         helper.make_node("Mul", ["s", "c"], ["a"])], {}, 17, ("hardswish", {})),
    "gelu": ([helper.make_node("Gelu", ["c"], ["a"])], {}, 20, ("gelu", {})),
    "gelu_erf": ([helper.make_node("Div", ["c", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["f"]), helper.make_node("Mul", ["c", "f"], ["g"]),
                  helper.make_node("Mul", ["g", "half"], ["a"])],
                 {"sqrt2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32),
                  "half": np.array(0.5, np.float32)}, 17, ("gelu", {})),
    "tanh": ([helper.make_node("Tanh", ["c"], ["a"])], {}, 17, ("tanh", {})),
    "sigmoid": ([helper.make_node("Sigmoid", ["c"], ["a"])], {}, 17, ("sigmoid", {})),
    "dropout_then_relu": ([helper.make_node("Dropout", ["c"], ["d"]), helper.make_node("Relu", ["d"], ["a"])],
                          {}, 17, ("relu", {})),
    "none": ([helper.make_node("Abs", ["c"], ["a"])], {}, 17, ("none", {})),
}


@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_activation_patterns(case, tmp_path):
    nodes, inits, opset, (name, params) = ACTIVATION_CASES[case]
    graph = hpa.load(save(_conv_then(nodes, opset, inits), tmp_path / "m.onnx"))
    conv = graph["conv"]
    assert (conv.activation, conv.activation_params) == (name, pytest.approx(params))
    assert graph["next"].predecessors == ("conv",)
    if name != "none":
        via_name = "hardtanh" if name == "relu6" else name  # as the torch tracer names F.hardtanh
        assert graph["next"].via == {"conv": (via_name,)}
    assert graph.skipped == []


def _rebuilt_matches_runtime(model, path, x):
    from hpa.backends.onnx.runtime import run_onnx

    save(model, path)
    graph = hpa.load(str(path))
    expected = run_onnx(path, x)[0]
    got = run_layer(graph.layers[0], torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert graph.layers[0].output_shape == expected.shape[1:]
    return graph.layers[0]


@pytest.mark.parametrize("auto_pad, stride, size, pairs", [
    ("SAME_UPPER", 2, 8, ((0, 1), (0, 1))),
    ("SAME_LOWER", 2, 8, ((1, 0), (1, 0))),
    ("SAME_UPPER", 2, 9, ((1, 1), (1, 1))),
    ("SAME_UPPER", 1, 7, ((1, 1), (1, 1))),
    ("VALID", 2, 9, ((0, 0), (0, 0))),
])
def test_conv_auto_pad(auto_pad, stride, size, pairs, tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad=auto_pad, strides=[stride, stride])]
    model = make_model(nodes, {"w": W, "b": B}, input_shape=(1, 3, size, size))
    layer = _rebuilt_matches_runtime(model, tmp_path / "m.onnx", rand(1, 3, size, size))
    assert layer.padding == pairs


def test_conv_explicit_asymmetric_pads_and_dilation(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 2, 1, 1], dilations=[2, 1], strides=[1, 2])]
    layer = _rebuilt_matches_runtime(make_model(nodes, {"w": W}), tmp_path / "m.onnx", rand(1, 3, 8, 8))
    assert layer.padding == ((0, 1), (2, 1)) and layer.dilation == (2, 1) and layer.stride == (1, 2)


def test_zero_pad_node_is_folded_into_conv_padding(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 1, 1, 1])]
    pads = np.array([0, 0, 0, 1, 0, 0, 2, 0], np.int64)  # W begins +1, H ends +2
    layer = _rebuilt_matches_runtime(make_model(nodes, {"w": W, "pads": pads}), tmp_path / "m.onnx",
                                     rand(1, 3, 8, 8))
    assert layer.padding == ((1, 3), (2, 1))
    assert layer.input_shape == (3, 8, 8)


def test_reflect_pad_is_not_folded(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    graph = hpa.load(save(make_model(nodes, {"w": W, "pads": np.array([0, 0, 1, 1] * 2, np.int64)}),
                          tmp_path / "m.onnx"))
    assert graph["conv"].padding == ((0, 0), (0, 0))
    assert graph["conv"].via == {"input": ("pad",)}


@pytest.mark.parametrize("attrs, size", [
    ({"strides": [2, 2], "pads": [1, 0, 1, 0], "output_padding": [1, 0]}, 5),
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 5),
    ({"strides": [3, 2], "output_shape": [16, 11]}, 5),
    ({"strides": [2, 2], "group": 2, "dilations": [2, 1]}, 4),
])
def test_conv_transpose(attrs, size, tmp_path):
    groups = attrs.get("group", 1)
    w = rand(4, 6 // groups, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)]
    model = make_model(nodes, {"w": w, "b": rand(6)}, input_shape=(1, 4, size, size))
    layer = _rebuilt_matches_runtime(model, tmp_path / "m.onnx", rand(1, 4, size, size))
    assert layer.kind == "conv_transpose2d" and layer.out_channels == 6 and layer.groups == groups


@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 1.0, 1.0), (0, 2.0, 0.5)])
def test_gemm_as_linear(trans_b, alpha, beta, tmp_path):
    weight, bias = rand(5, 12), rand(5)
    stored = weight if trans_b else weight.T
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=trans_b, alpha=alpha, beta=beta)]
    inits = {"w": rand(3, 3, 1, 1), "fc.weight": stored, "fc.bias": bias}
    layer = hpa.load(save(make_model(nodes, inits, input_shape=(1, 3, 2, 2)), tmp_path / "m.onnx")).layers[1]
    assert layer.kind == "linear" and layer.name == "fc"
    np.testing.assert_allclose(layer.weight, weight * alpha, rtol=1e-6)
    np.testing.assert_allclose(layer.bias, bias * beta, rtol=1e-6)
    assert layer.predecessors == ("conv",) and layer.via == {"conv": ("flatten",)}
    assert layer.input_shape == (12,) and layer.output_shape == (5,)


def test_matmul_with_constant_weight_and_bias_add(tmp_path):
    weight, bias = rand(5, 6), rand(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "wt"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "bias"], ["y"])]
    inits = {"w": rand(2, 3, 1, 1), "shape": np.array([1, 2, 6], np.int64), "wt": np.ascontiguousarray(weight.T),
             "bias": bias}
    graph = hpa.load(save(make_model(nodes, inits, input_shape=(1, 3, 2, 3)), tmp_path / "m.onnx"))
    fc = graph["fc"]
    np.testing.assert_array_equal(fc.weight, weight)
    np.testing.assert_allclose(fc.bias, bias)
    assert fc.input_shape == (2, 6) and fc.output_shape == (2, 5)
    assert fc.predecessors == ("conv",) and fc.via == {"conv": ("reshape",)}


def test_matmul_between_activations_is_an_op(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["c", "t"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    graph = hpa.load(save(make_model(nodes, {"w": W, "w2": rand(2, 4, 1, 1)}), tmp_path / "m.onnx"))
    assert [l.name for l in graph] == ["conv", "conv2"]
    assert set(graph["conv2"].via["conv"]) == {"transpose", "matmul"}
    assert graph.skipped == []


def test_per_channel_mul_add_is_folded(tmp_path):
    scale, shift = rand(4, 1, 1), rand(1, 4, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Mul", ["scale", "c"], ["m"]),
             helper.make_node("Add", ["m", "shift"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, {"w": W, "b": B, "scale": scale, "shift": shift})
    layer = hpa.load(save(model, tmp_path / "m.onnx")).layers[0]
    np.testing.assert_allclose(layer.weight, W * scale.reshape(4, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(layer.bias, B * scale.reshape(4) + shift.reshape(4), rtol=1e-6)
    assert layer.bn_folded and layer.activation == "relu"
    raw = hpa.load(str(tmp_path / "m.onnx"), fold_bn=False).layers[0]
    np.testing.assert_array_equal(raw.weight, W)
    assert not raw.bn_folded and raw.activation == "none"


def test_spatial_mul_is_not_folded(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "mask"], ["m"]),
             helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, {"w": W, "mask": rand(1, 1, 8, 8)})
    layer = hpa.load(save(model, tmp_path / "m.onnx")).layers[0]
    np.testing.assert_array_equal(layer.weight, W)
    assert not layer.bn_folded and layer.activation == "none"


def test_batchnorm_after_conv_matches_runtime(tmp_path):
    gamma, beta, mean, var = rand(4), rand(4), rand(4), np.abs(rand(4)) + 0.5
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["y"], epsilon=1e-3)]
    model = make_model(nodes, {"w": W, "b": B, "g": gamma, "be": beta, "m": mean, "v": var})
    layer = _rebuilt_matches_runtime(model, tmp_path / "m.onnx", rand(1, 3, 8, 8))
    assert layer.bn_folded and layer.weight.dtype == np.float64


def test_unknown_operator_is_skipped_with_a_reason(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mystery", ["c"], ["m"], domain="com.example", name="odd"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, {"w": W, "w2": rand(2, 4, 1, 1)})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    graph = hpa.load(save(model, tmp_path / "m.onnx"))
    assert [l.name for l in graph] == ["conv", "conv2"]
    assert graph["conv2"].predecessors == ("conv",) and graph["conv2"].via == {"conv": ("mystery",)}
    [skipped] = graph.skipped
    assert skipped.name == "odd" and "com.example::Mystery" in skipped.reason and "unknown" in skipped.reason


def test_runtime_weight_and_unsupported_layers_are_skipped(tmp_path):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("wx", TensorProto.FLOAT, [4, 3, 3, 3])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Conv", ["x", "wx"], ["d"], name="dynamic"),
             helper.make_node("Add", ["c", "d"], ["y"])]
    graph = hpa.load(save(make_model(nodes, {"w": W}, inputs=inputs), tmp_path / "m.onnx"))
    assert [l.name for l in graph] == ["conv"]
    [skipped] = graph.skipped
    assert skipped.name == "dynamic" and "'wx'" in skipped.reason and "run time" in skipped.reason


# -- bad input ---------------------------------------------------------------------------------------


@pytest.fixture
def good_onnx(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    return export(model, (3, 16, 16), tmp_path / "good.onnx", keep_bn=False)


def _bad_files(tmp_path, good_onnx):
    data = good_onnx.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    not_model = tmp_path / "tensor.onnx"
    not_model.write_bytes(numpy_helper.from_array(rand(8, 8), "t").SerializeToString())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    missing = tmp_path / "missing_ext.onnx"
    onnx.save(onnx.load(str(good_onnx)), str(missing), save_as_external_data=True, location="missing.bin",
              size_threshold=0)
    (tmp_path / "missing.bin").unlink()
    return {"truncated": (truncated, "truncated"), "not a model": (not_model, "not"),
            "garbage": (garbage, "onnx"), "missing external data": (missing, "missing")}


def test_bad_files_raise_load_error(tmp_path, good_onnx):
    for what, (path, word) in _bad_files(tmp_path, good_onnx).items():
        with pytest.raises(LoadError) as info:
            hpa.load(str(path))
        message = str(info.value)
        assert "\n" not in message and word in message.lower(), (what, message)


def test_bad_files_through_the_cli(tmp_path, good_onnx, run_hpa):
    for what, (path, word) in _bad_files(tmp_path, good_onnx).items():
        out = tmp_path / f"out_{path.stem}"
        proc = run_hpa("scan", path, "--out", out)
        assert_bad_input(proc, word)
        assert not out.exists(), what


def test_cli_scans_an_onnx_file(tmp_path, good_onnx, run_hpa):
    import json

    proc = run_hpa("scan", good_onnx, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["loader"] == "onnx"
    assert [layer["kind"] for layer in data["layers"]] == ["conv2d", "conv2d"]
