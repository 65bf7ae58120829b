"""The channel-wise-ReLU conv of Gamba et al. 2019 eq. (4) and the networks built from it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpa
from hpa.nn import ChannelReLUConv2d, lenet9, vgg9


def per_channel_loop(module: ChannelReLUConv2d, x: torch.Tensor) -> torch.Tensor:
    """eq. (4) one (filter, channel) kernel at a time."""
    outputs = []
    for o in range(module.out_channels):
        total = 0
        for c in range(module.in_channels):
            bias = None if module.bias is None else module.bias[o, c].reshape(1)
            response = F.conv2d(x[:, c:c + 1], module.weight[o, c][None, None], bias, module.stride,
                                module.padding, module.dilation)
            total = total + torch.relu(response)
        if module.out_bias is not None:
            total = total + module.out_bias[o]
        outputs.append(total)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2), out_bias=True),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=1, bias=False),
])
def test_matches_a_loop_over_channels(kwargs):
    torch.manual_seed(0)
    module = ChannelReLUConv2d(3, 4, **kwargs)
    with torch.no_grad():
        if module.bias is not None:
            module.bias.normal_()
        if module.out_bias is not None:
            module.out_bias.normal_()
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(module(x), per_channel_loop(module, x), rtol=1e-5, atol=1e-5)


def test_the_relu_comes_before_the_sum():
    module = ChannelReLUConv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1))
    x = torch.tensor([2.0, 3.0]).reshape(1, 2, 1, 1)
    # relu(2) + relu(-3) = 2, where a plain conv then ReLU would give relu(2 - 3) = 0
    assert module(x).item() == 2.0


def test_gradients_reach_every_parameter():
    module = ChannelReLUConv2d(2, 3, 3, padding=1, out_bias=True)
    with torch.no_grad():
        module.bias.fill_(0.1)
    module(torch.randn(2, 2, 5, 5)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_reset_parameters_zero_biases():
    module = ChannelReLUConv2d(3, 5, 3)
    assert module.weight.shape == (5, 3, 3, 3) and module.bias.shape == (5, 3)
    assert not module.bias.any() and module.weight.std() > 0


def test_tracer_sees_one_layer_with_channel_biases():
    torch.manual_seed(0)
    model = nn.Sequential(ChannelReLUConv2d(3, 4, 3, padding=1), ChannelReLUConv2d(4, 2, 3, padding=1))
    with torch.no_grad():
        for module in model:
            module.bias.normal_()
    graph = hpa.load(model, input_size=(3, 7, 7))
    assert [layer.name for layer in graph] == ["0", "1"]
    for layer, module in zip(graph, model):
        assert layer.kind == "conv2d" and layer.groups == 1
        assert layer.stride == (1, 1) and layer.padding == ((1, 1), (1, 1))
        np.testing.assert_array_equal(layer.weight, module.weight.detach().numpy())
        np.testing.assert_array_equal(layer.channel_bias, module.bias.detach().numpy())
        assert layer.bias is None
    assert graph["0"].input_shape == (3, 7, 7) and graph["1"].output_shape == (2, 7, 7)
    assert graph["1"].predecessors == ("0",)
    entry = hpa.scan(model, statistics=["cones"], input_size=(3, 7, 7)).to_dict()["pairs"][0]
    assert entry["bias_rule"] == "per-channel" and entry["n_cones"] == 8


@pytest.mark.parametrize("build, widths", [(lenet9, [6, 6, 16, 16, 64, 64]), (vgg9, [64, 64, 128, 128, 256, 256])])
@pytest.mark.parametrize("channel_relu", [True, False])
def test_seed_000_networks(build, widths, channel_relu):
    torch.manual_seed(0)
    model = build(channel_relu=channel_relu)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    graph = hpa.load(model, input_size=(3, 32, 32))
    assert graph.summary() == {"conv2d": 6, "linear": 3}  # 9 learned layers
    assert [layer.out_channels for layer in graph if layer.kind == "conv2d"] == widths
    assert all((layer.channel_bias is not None) == channel_relu for layer in graph if layer.kind == "conv2d")
    if build is lenet9:
        result = hpa.scan(model, statistics=["cones"], input_size=(3, 32, 32))
        pairs = result.to_dict()["pairs"]
        assert [e["plane"] for e in pairs] == [[32, 32], [16, 16], [8, 8]]
        assert {e["bias_rule"] for e in pairs} == {"per-channel" if channel_relu else "split"}


def test_tracer_keeps_the_channel_wise_relu_and_never_folds_a_bn_after_the_sum():
    torch.manual_seed(0)
    model = nn.Sequential(ChannelReLUConv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.fill_(-2.0)
    layer = hpa.load(model, input_size=(2, 6, 6))["0"]
    assert layer.activation == "relu" and not layer.bn_folded
    np.testing.assert_array_equal(layer.weight, model[0].weight.detach().numpy())


class _BusyNeighbour(nn.Module):
    """Runs another network's forward pass on a second thread in the middle of its own, as a trainer's
    training thread does while its writer thread traces a snapshot."""

    def __init__(self, neighbour: nn.Module) -> None:
        super().__init__()
        self.neighbour = [neighbour]  # a list: not a submodule of this network
        self.first, self.second = ChannelReLUConv2d(3, 4, 3, padding=1), ChannelReLUConv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = self.first(x)
        other = threading.Thread(target=self.neighbour[0], args=(torch.randn(1, 3, 7, 7),))
        other.start()
        other.join()
        return self.second(x)


def test_a_forward_pass_on_another_thread_does_not_enter_the_trace():
    """Module hooks are process-wide: this was 'the initial snapshot has no layer ...' for cifar:lenet9."""
    torch.manual_seed(0)
    neighbour = nn.Sequential(ChannelReLUConv2d(3, 5, 3, padding=1), ChannelReLUConv2d(5, 5, 3, padding=1))
    model = _BusyNeighbour(neighbour)
    graph = hpa.load(model, input_size=(3, 7, 7))
    assert [layer.name for layer in graph] == ["first", "second"]
    assert [layer.out_channels for layer in graph] == [4, 2]
    assert graph["second"].predecessors == ("first",)
