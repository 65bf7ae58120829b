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


def test_forward_failure_names_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(hpa.LoadError, match="--input-size"):
        hpa.load(model, input_size=(3, 10, 10))
