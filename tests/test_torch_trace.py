"""The torch tracer: attributes, connectivity, activations and padding, checked against the modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpa


class Block(nn.Module):
    """A residual block with a concat branch, to exercise connectivity."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 4, 3, padding=2, dilation=2, groups=4)
        self.head = nn.Conv2d(8, 6, 3, stride=2)
        self.unused = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.sigmoid(self.a(x)) + x
        z = torch.cat([F.leaky_relu(self.b(y), 0.3), F.hardtanh(self.c(y), 0, 6)], dim=1)
        z = F.max_pool2d(z, 2)
        return self.fc(F.gelu(self.head(z)).mean((2, 3)))


def test_attributes_connectivity_and_activations():
    graph = hpa.load(Block(), input_size=(3, 16, 16))
    assert [l.name for l in graph] == ["stem", "a", "b", "c", "head", "fc"]
    assert [l.activation for l in graph] == ["relu", "sigmoid", "leaky_relu", "relu6", "gelu", "none"]
    assert graph["b"].activation_params == {"negative_slope": 0.3}
    assert graph["a"].predecessors == ("stem",) and graph["a"].via == {"stem": ("relu",)}
    assert set(graph["b"].predecessors) == {"stem", "a"}
    assert "add" in graph["b"].via["a"] and "add" in graph["b"].via["stem"]
    assert set(graph["head"].predecessors) == {"b", "c"}
    assert graph["head"].via["b"] == ("leaky_relu", "cat", "max_pool2d")
    c = graph["c"]
    assert (c.stride, c.padding, c.dilation, c.groups) == ((1, 1), ((2, 2), (2, 2)), (2, 2), 4)
    assert c.weight.shape == (4, 2, 3, 3) and c.in_channels == 8
    assert graph["head"].input_shape == (8, 8, 8) and graph["head"].output_shape == (6, 3, 3)
    assert graph["stem"].predecessors == ("input",)
    assert [s.name for s in graph.skipped] == ["unused"]


def test_weights_are_the_modules_own():
    model = Block().eval()
    graph = hpa.load(model, input_size=(3, 16, 16), fold_bn=False)
    for name in ["stem", "a", "b", "c", "head", "fc"]:
        module = getattr(model, name)
        np.testing.assert_array_equal(graph[name].weight, module.weight.detach().numpy())
        np.testing.assert_array_equal(graph[name].bias, module.bias.detach().numpy())


def test_zero_pad_before_conv_becomes_asymmetric_padding():
    model = nn.Sequential(nn.ZeroPad2d((1, 2, 0, 3)), nn.Conv2d(2, 3, 3, padding=1)).eval()
    layer = hpa.load(model, input_size=(2, 9, 9))["1"]
    assert layer.padding == ((1, 4), (2, 3))
    assert layer.input_shape == (2, 9, 9)
    x = torch.randn(1, 2, 9, 9)
    (top, bottom), (left, right) = layer.padding
    rebuilt = F.conv2d(F.pad(x, (left, right, top, bottom)), torch.from_numpy(layer.weight),
                       torch.from_numpy(layer.bias))
    torch.testing.assert_close(rebuilt, model(x))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_non_zero_padding_modes_are_not_merged(mode):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)).eval()
    layer = hpa.load(model, input_size=(2, 6, 6))["0"]
    assert layer.padding == ((0, 0), (0, 0))
    assert layer.via["input"] == ("pad",)


def test_same_padding_puts_the_extra_pixel_at_the_end():
    model = nn.Sequential(nn.Conv2d(1, 1, 4, padding="same")).eval()
    assert hpa.load(model, input_size=(1, 8, 8))["0"].padding == ((1, 2), (1, 2))


def test_torchscript_archive_gives_the_same_graph(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.LeakyReLU(0.1),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(-1, 1)
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    expected = hpa.load(model, input_size=(3, 8, 8))
    got = hpa.load(path)
    assert got.source["content"] == "torchscript"
    for a, b in zip(expected, got):
        assert (a.name, a.kind, a.stride, a.padding, a.dilation, a.groups, a.activation, a.bn_folded) == \
               (b.name, b.kind, b.stride, b.padding, b.dilation, b.groups, b.activation, b.bn_folded)
        assert a.predecessors == b.predecessors
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12)
    assert len(expected) == len(got)


def save_archive(model, path, *, traced: bool, input_size=(2, 9, 8)):
    """A TorchScript archive: scripted ``F.pad`` is ``aten::pad``, traced is ``aten::constant_pad_nd``."""
    archived = torch.jit.trace(model, torch.randn(1, *input_size)) if traced else torch.jit.script(model)
    archived.save(str(path))
    return path


def rebuilt_conv(layer, x):
    """The conv re-run from the graph's own fields alone, its (begin, end) pairs applied as zeros."""
    (top, bottom), (left, right) = layer.padding
    return F.conv2d(F.pad(x, (left, right, top, bottom)), torch.from_numpy(np.array(layer.weight)),
                    torch.from_numpy(np.array(layer.bias)), stride=layer.stride, dilation=layer.dilation)


@pytest.mark.parametrize("traced", [False, True], ids=["scripted", "traced"])
@pytest.mark.parametrize("pad", [nn.ZeroPad2d((0, 1, 2, 0)), nn.ConstantPad2d((3, 0, 1, 1), 0.0)],
                         ids=["ZeroPad2d", "ConstantPad2d-0"])
def test_torchscript_merges_a_zero_pad_into_the_convs_padding(tmp_path, traced, pad):
    torch.manual_seed(4)
    model = nn.Sequential(pad, nn.Conv2d(2, 3, 3, padding=(1, 0)), nn.ReLU()).eval()
    [layer] = list(hpa.load(save_archive(model, tmp_path / "m.pt", traced=traced), input_size=(2, 9, 8)))
    left, right, top, bottom = pad.padding
    assert layer.padding == ((top + 1, bottom + 1), (left, right))
    assert layer.via == {"input": ()}  # the pad is inside the conv now, not an op on the way
    x = torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(F.relu(rebuilt_conv(layer, x)), model(x))


@pytest.mark.parametrize("traced", [False, True], ids=["scripted", "traced"])
@pytest.mark.parametrize("pad", [nn.ReflectionPad2d((0, 1, 2, 0)), nn.ReplicationPad2d(1),
                                 nn.ConstantPad2d((0, 1, 2, 0), 0.5)], ids=["reflect", "replicate", "value-0.5"])
def test_torchscript_keeps_a_pad_it_cannot_merge_as_an_op_on_the_way(tmp_path, traced, pad):
    """Not zeros: the conv's own padding stays, and the pad is recorded in ``via``, never dropped."""
    model = nn.Sequential(pad, nn.Conv2d(2, 3, 3)).eval()
    [layer] = list(hpa.load(save_archive(model, tmp_path / "m.pt", traced=traced), input_size=(2, 9, 8)))
    assert layer.padding == ((0, 0), (0, 0))
    assert layer.via == {"input": ("pad",)}


class SharedPad(nn.Module):
    """One zero pad feeding two convs: merging it into one would hide it from the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3)

    def forward(self, x):
        padded = F.pad(x, [1, 1, 1, 1])
        return self.a(padded) + self.b(padded)


def test_torchscript_keeps_a_zero_pad_with_two_consumers_as_an_op(tmp_path):
    graph = hpa.load(save_archive(SharedPad().eval(), tmp_path / "m.pt", traced=False), input_size=(2, 9, 8))
    for layer in graph:
        assert layer.padding == ((0, 0), (0, 0))
        assert layer.via == {"input": ("pad",)}


def test_forward_failure_names_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(hpa.LoadError, match="--input-size"):
        hpa.load(model, input_size=(3, 10, 10))


# -- where each layer's numbers come from (Layer.params) ----------------------------------------

def test_params_name_the_state_dict_keys_of_each_layer():
    model = Block()
    graph = hpa.load(model, input_size=(3, 16, 16))
    state = model.state_dict()
    for layer in graph:
        assert layer.params == {"weight": f"{layer.name}.weight", "bias": f"{layer.name}.bias"}
        assert all(key in state for key in layer.params.values())


def bn_net(eps: float = 1e-3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=eps), nn.ReLU(),
                         nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6, affine=False),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 5), nn.BatchNorm1d(5), nn.ReLU())


def test_params_of_a_folded_batchnorm_name_its_tensors_and_eps():
    graph = hpa.load(bn_net(), input_size=(3, 8, 8))
    assert graph["0"].params == {"weight": "0.weight", "bn.weight": "1.weight", "bn.bias": "1.bias",
                                 "bn.running_mean": "1.running_mean", "bn.running_var": "1.running_var",
                                 "bn.eps": 1e-3}
    assert graph["3"].params == {"weight": "3.weight", "bias": "3.bias", "bn.running_mean": "4.running_mean",
                                 "bn.running_var": "4.running_var", "bn.eps": 1e-5}  # affine=False
    assert graph["6"].params["bn.running_var"] == "7.running_var" and graph["6"].bn_folded
    unfolded = hpa.load(bn_net(), input_size=(3, 8, 8), fold_bn=False)
    assert unfolded["0"].params == {"weight": "0.weight"}


class Computed(nn.Module):
    """Weights that are not tensors of the state: computed, and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("kernel", torch.randn(4, 4, 1, 1), persistent=False)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.conv2d(x, self.raw / self.raw.norm())
        x = F.conv2d(x, self.kernel, self.conv.bias)
        return F.conv2d(x, self.conv.weight, self.raw.sum((1, 2, 3)))  # computed bias


def test_a_weight_or_bias_that_is_not_in_the_state_gives_empty_params():
    graph = hpa.load(Computed(), input_size=(3, 8, 8))
    assert [layer.params for layer in graph] == [{}, {}, {}]


def test_torchscript_layers_record_params_and_unique_names(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.drop = nn.Dropout2d()

        def forward(self, x):
            return self.conv(F.relu(self.drop(self.bn(self.conv(x)))))

    model = Twice().eval()
    path = tmp_path / "twice.jit"
    torch.jit.script(model).save(str(path))
    got = hpa.load(path)
    expected = hpa.load(model, input_size=(3, 8, 8))
    assert [l.name for l in got] == [l.name for l in expected] == ["conv", "conv#2"]
    assert [l.params for l in got] == [l.params for l in expected]
    assert got["conv"].params["bn.running_var"] == "bn.running_var"
    # Dropout2d is aten::feature_dropout in TorchScript: an inference identity, not the end of the chain
    assert got["conv"].activation == expected["conv"].activation == "relu"


# -- op names come from hpa.graph -------------------------------------------------------------

ACTIVATION_CALLS = {
    "relu": F.relu, "leaky_relu": F.leaky_relu, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "elu": F.elu, "mish": F.mish, "softplus": F.softplus,
    "relu6": F.relu6, "threshold": lambda x: F.threshold(x, 0.1, 0.0),
    "relu#clamp": lambda x: torch.clamp(x, min=0), "relu6#clip": lambda x: torch.clip(x, 0, 6),
}


@pytest.mark.parametrize("expected", ACTIVATION_CALLS)
def test_activations_are_named_by_the_canonical_set(expected):
    from hpa.graph import ACTIVATIONS

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return ACTIVATION_CALLS[expected](nn.functional.dropout(self.conv(x), training=False))

    layer = hpa.load(Net(), input_size=(2, 4, 4))["conv"]
    assert layer.activation == expected.split("#")[0]
    assert layer.activation in ACTIVATIONS
