"""Torch modules from the seeds: the channel-wise-ReLU conv of Gamba et al. 2019 eq. (4) and its networks.

``ChannelReLUConv2d`` computes, for filter ``o``,

    out[o] = b_o + sum_c relu( W[o, c] * x[c] + beta[o, c] )

(``*`` is the 2-D cross-correlation): each input channel is convolved with its
own kernel plus its own bias, rectified, and only then summed.  Every
single-channel kernel therefore defines its own cone, which is what the cone
statistics (``plugins/cones.py``) study.  Seed 000 §4 swaps the order of the
channel sum and the ReLU this way "to make the theory as tight as possible".

The built-in ``cifar`` plugin registers :func:`channel_relu_converter` through the
``register_module_converters`` hook, as a third-party plugin would, so that
``hpa.load(model)`` sees each ``ChannelReLUConv2d`` as one conv layer whose
``channel_bias`` is ``beta`` (bias rule "per-channel").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpa.backends.torch_trace import to_numpy
from hpa.graph import Layer
from hpa.registry import ModuleConverter


__all__ = ["ChannelReLUConv2d", "lenet9", "vgg9", "LENET9_CONVS", "VGG9_CONVS"]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


class ChannelReLUConv2d(nn.Module):
    """The channel-wise-ReLU conv of Gamba et al. 2019 eq. (4).

    ``weight`` is ``(out_channels, in_channels, k1, k2)`` like ``nn.Conv2d``;
    ``bias`` is ``(out_channels, in_channels)``: one bias per (filter, input
    channel) kernel, applied before that channel's ReLU.  ``out_bias`` adds
    the filter bias ``b_o`` of eq. (4) after the sum (off by default, as in
    the reference code).  The ReLU is channel-wise: it is part of the layer,
    so the tracer records the layer's activation as "relu" in that sense.

    The forward pass is one grouped conv (``groups=in_channels``) producing
    ``in_channels * out_channels`` maps with their biases, one ReLU, and a
    reshape-and-sum over the input channels: no Python loop over channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, out_bias: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels, self.in_channels)) if bias else None
        self.out_bias = nn.Parameter(torch.empty(self.out_channels)) if out_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weights as ``nn.Conv2d`` draws them; zero biases, as Gamba et al. 2019 §4 trained."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        for bias in (self.bias, self.out_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in, c_out = self.in_channels, self.out_channels
        # Group c of the grouped conv holds the kernels W[:, c], so map c*out + o is W[o, c] * x[c].
        weight = self.weight.transpose(0, 1).reshape(c_in * c_out, 1, *self.kernel_size)
        bias = None if self.bias is None else self.bias.transpose(0, 1).reshape(c_in * c_out)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups=c_in)
        y = F.relu(y)
        y = y.view(y.shape[0], c_in, c_out, *y.shape[2:]).sum(1)
        if self.out_bias is not None:
            y = y + self.out_bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, out_bias={self.out_bias is not None}")


def _convert(module: ChannelReLUConv2d, name: str, x: torch.Tensor, y: torch.Tensor) -> Layer:
    """The tracer's view of a ChannelReLUConv2d: one conv2d with per-channel biases."""
    weight = to_numpy(module.weight)
    if module.bias is not None:
        channel_bias = to_numpy(module.bias)
    else:
        channel_bias = torch.zeros(module.out_channels, module.in_channels, dtype=torch.float64).numpy()
    return Layer(
        name=name, index=0, kind="conv2d", weight=weight,
        bias=None if module.out_bias is None else to_numpy(module.out_bias),
        stride=module.stride, padding=tuple((p, p) for p in module.padding), dilation=module.dilation, groups=1,
        activation="relu",  # channel-wise: applied to each input channel's response before the sum
        input_shape=tuple(x.shape[1:]), output_shape=tuple(y.shape[1:]), channel_bias=channel_bias,
    )



def channel_relu_converter() -> ModuleConverter:
    """The tracer's converter of :class:`ChannelReLUConv2d` (registered by the built-in ``cifar`` plugin)."""
    return ModuleConverter(ChannelReLUConv2d, _convert)


# -- the networks of Gamba et al. 2019 §4 (reference code: LeNet9 and VGG9, 9 learned layers each) --------

#: Conv widths, "M" = 2x2 max-pool.  Six 3x3 convs (padding 1) and three linear layers each.
LENET9_CONVS = (6, 6, "M", 16, 16, "M", 64, 64, "M")
VGG9_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class _Net(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _features(widths, in_channels: int, channel_relu: bool) -> tuple[nn.Sequential, int, int]:
    layers: list[nn.Module] = []
    pools = 0
    for width in widths:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
            pools += 1
        elif channel_relu:
            layers.append(ChannelReLUConv2d(in_channels, width, 3, padding=1))
            in_channels = width
        else:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
    return nn.Sequential(*layers), in_channels, pools


def _network(widths, hidden: tuple[int, int], num_classes: int, in_channels: int, input_size: int,
             channel_relu: bool) -> nn.Module:
    features, channels, pools = _features(widths, in_channels, channel_relu)
    side = input_size // 2**pools
    a, b = hidden
    classifier = nn.Sequential(
        nn.Linear(channels * side * side, a), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(b, num_classes),
    )
    return _Net(features, classifier)


def lenet9(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, channel_relu: bool = True) -> nn.Module:
    """LeNet-like network of Gamba et al. 2019 §4: convs 6, 6, M, 16, 16, M, 64, 64, M; linears 120, 84, classes.

    With ``channel_relu`` (the default) every conv is a :class:`ChannelReLUConv2d`, as Gamba et al. 2019
    trained it; otherwise plain ``nn.Conv2d`` followed by ``nn.ReLU``.
    """
    return _network(LENET9_CONVS, (120, 84), num_classes, in_channels, input_size, channel_relu)


def vgg9(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, channel_relu: bool = True) -> nn.Module:
    """VGG-like network of Gamba et al. 2019 §4: convs 64, 64, M, 128, 128, M, 256, 256, M; linears 512, 512, classes."""
    return _network(VGG9_CONVS, (512, 512), num_classes, in_channels, input_size, channel_relu)
