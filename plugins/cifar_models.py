"""``cifar:NAME``: the networks the papers trained on small images, as a loader that also builds.

``hpa list-models cifar``, ``hpa scan cifar:vgg19 --weights none`` and
``hpa train --arch cifar:vgg19`` share these names.  ``build`` returns the
trainable module; ``load`` is ``trace(build(...))``.

* ``vgg11`` ... ``vgg19``, ``alexnet``: torchvision's definitions without
  BatchNorm (``num_classes`` and ``in_channels`` from the task), at any input
  size their layers take: ImageNet's 224x224 as torchvision defines them.
  AlexNet's stride-4 stem cannot take 32x32, so an input under 63x63 is
  upscaled first (``-o upscale=64``, the smallest side torchvision's AlexNet
  accepts); from 63x63 up it is torchvision's AlexNet unchanged.
* ``vgg11_cifar`` ... ``vgg19_cifar``: the same conv stacks with the compact
  CIFAR head of the cone paper's code: (Linear 512, ReLU, Dropout) twice, then
  Linear to the classes.
* ``lenet9``, ``vgg9``: Gamba et al. 2019's 9-layer networks with the channel-wise-ReLU
  conv; ``lenet9_relu``, ``vgg9_relu``: the same with plain conv + ReLU;
  ``lenet6``: Gamba et al. 2020 A.7's 6-conv LeNet (the plain-ReLU ``lenet9``;
  at 28x28 its head is the 2020 code's 576-120-84-classes).

Each network trains by default with the initialisation its paper's code used
(``init_scheme``, shown by ``hpa list-models cifar``): torchvision's VGG init
(``kaiming_conv``) for VGG, PyTorch's own for AlexNet, Xavier-uniform for the
2020 LeNet, Xavier-normal for the 2019 networks.  The small networks have no
published code; they take ``kaiming_normal``, which trained them fastest on
digits (validation accuracy 0.93 after 6 epochs, against 0.35 for
``kaiming_conv`` and 0.52 for PyTorch's own).
* ``small_max``, ``small_avg``, ``small_maxavg``, ``small_stride``,
  ``small_dilation``, ``small_dilation_inc``: Milisavljevic's 4-conv, 64-filter CNN
  with each way of widening the context (max, average, max+average pooling;
  stride-2 convs; dilation 2; dilation growing with depth).  A pool that
  would shrink a 1x1 map is left out, so these also take 8x8 digits.

``--weights``: ``none`` for a seeded random init, or the path of a state_dict
file (e.g. a snapshot of ``hpa train``).  torch is imported only when building.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from hpa import LoadOptions, Loader, Option, OptionError, SpecError, hookimpl, suggest

PREFIX = "cifar"
DEFAULT_INPUT = (3, 32, 32)

OPTIONS = (
    Option("num_classes", int, 10, "classes of the last layer"),
    Option("in_channels", int, None, "input channels (default: from --input-size, else 3)"),
    Option("upscale", int, 64, "alexnet only: side the input is resized to before the stem"),
)


@hookimpl
def register_module_converters(register):
    """hpa.nn.ChannelReLUConv2d, the channel-wise-ReLU conv of lenet9 and vgg9, traced as one conv layer."""
    from hpa.nn import channel_relu_converter  # torch: the hook runs when a module is first traced

    register(channel_relu_converter())


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, build=build, list_models=list_models, builds_init=True,
                    options=OPTIONS, init_scheme=init_scheme,
                    description="the papers' networks for 32x32 inputs, VGG and AlexNet at 224x224 too (VGG, AlexNet, LeNet, Gamba et al. 2019 and Milisavljevic nets)"))


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def init_scheme(name: str) -> str:
    """The init scheme (hpa.experiments.types.INIT_SCHEMES) that ``name``'s paper code used."""
    _builder(name)  # an unknown name: SpecError with "did you mean"
    return _INIT_SCHEMES.get(name) or _INIT_SCHEMES[name.split("_")[0]]


def build(name: str, options: LoadOptions):
    """The trainable module ``name``, freshly initialised under ``options.seed`` (global RNG untouched)."""
    import torch

    builder = _builder(name)
    channels, height, width = _input_size(options)
    extra = dict(options.extra)
    num_classes = int(extra.get("num_classes") or 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return builder(num_classes=num_classes, in_channels=channels, side=min(height, width),
                       upscale=int(extra.get("upscale") or 64))


def load(name: str, options: LoadOptions):
    from hpa.backends.torch_trace import trace_module

    weights = options.weights
    if weights is None or weights.upper() == "DEFAULT":
        raise OptionError(f"cifar:{name} has no shipped weights; pass --weights none for a seeded random init "
                          "or --weights PATH for a saved state_dict (e.g. an hpa train snapshot)")
    model = build(name, options)
    if weights.lower() != "none":
        _load_weights(model, weights, options.trust_pickle, name)
    input_size = _input_size(options)
    source = {"weights": "none" if weights.lower() == "none" else os.fspath(weights), "seed": options.seed}
    return trace_module(model, input_size, fold_bn=options.fold_bn, source=source, seed=options.seed)


def _load_weights(model, path: str, trust_pickle: bool, name: str) -> None:
    from hpa.backends.torch_files import read_state_dict
    from hpa.backends.torch_models import load_into

    import numpy as np
    import torch

    state = read_state_dict(path, trust_pickle=trust_pickle)
    state = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
    load_into(model, state, f"cifar:{name} ({path})")


def _builder(name: str) -> Callable[..., Any]:
    if name not in _BUILDERS:
        raise SpecError(f"unknown cifar model {name!r}{suggest(name, _BUILDERS, PREFIX + ':')} "
                        "(list them with: hpa list-models cifar)")
    return _BUILDERS[name]


def _input_size(options: LoadOptions) -> tuple[int, int, int]:
    size = tuple(options.input_size or ())
    channels = options.extra.get("in_channels")
    if not size:
        size = (int(channels or DEFAULT_INPUT[0]), *DEFAULT_INPUT[1:])
    if len(size) != 3:
        raise OptionError(f"cifar: models take C,H,W inputs, not --input-size {','.join(map(str, size))}")
    if channels is not None and int(channels) != size[0]:
        raise OptionError(f"-o in_channels={channels} contradicts --input-size {','.join(map(str, size))}")
    return int(size[0]), int(size[1]), int(size[2])


# -- torchvision's networks ---------------------------------------------------------------------

def _torchvision(depth_name: str):
    def make(num_classes: int, in_channels: int, **_):
        import torchvision

        model = getattr(torchvision.models, depth_name)(weights=None, num_classes=num_classes)
        _set_in_channels(model.features, in_channels)
        return model

    return make


def _alexnet(num_classes: int, in_channels: int, upscale: int, side: int = 32, **_):
    import torchvision

    from torch import nn

    class UpscaledAlexNet(nn.Module):
        """torchvision's AlexNet (same parameter names) behind a bilinear resize to ``upscale``."""

        def __init__(self) -> None:
            super().__init__()
            net = torchvision.models.alexnet(weights=None, num_classes=num_classes)
            _set_in_channels(net.features, in_channels)
            self.upscale = upscale
            self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier

        def forward(self, x):
            x = nn.functional.interpolate(x, size=(self.upscale, self.upscale), mode="bilinear",
                                          align_corners=False)
            return self.classifier(self.avgpool(self.features(x)).flatten(1))

    if upscale < 63:
        raise OptionError(f"-o upscale={upscale} is too small for AlexNet's stem; use 63 or more (default 64)")
    if side >= 63:  # ImageNet's 224x224 (or any input the stem takes): torchvision's AlexNet as it is
        net = torchvision.models.alexnet(weights=None, num_classes=num_classes)
        _set_in_channels(net.features, in_channels)
        return net
    return UpscaledAlexNet()


def _set_in_channels(features, in_channels: int) -> None:
    """Replace the first conv when the task's images are not RGB (same hyper-parameters)."""
    from torch import nn

    first = features[0]
    if in_channels != first.in_channels:
        features[0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)


_VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def _vgg_cifar(config: str):
    def make(num_classes: int, in_channels: int, side: int, **_):
        from torch import nn

        layers: list[nn.Module] = []
        channels = in_channels
        for width in _VGG_CONFIGS[config]:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        pools = _VGG_CONFIGS[config].count("M")
        if side < 2 ** pools:
            raise OptionError(f"cifar:{config}_cifar needs inputs of at least {2 ** pools}x{2 ** pools}")
        flat = channels * (side // 2 ** pools) ** 2
        # The cone paper's code (magamba/cones, models.VGG): (Linear, ReLU, Dropout) twice, then Linear.
        classifier = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.Dropout(),
                                   nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(),
                                   nn.Linear(512, num_classes))
        return _FeaturesClassifier(nn.Sequential(*layers), classifier)

    return make


def _FeaturesClassifier(features, classifier):
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.classifier = features, classifier

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    return Net()


# -- Gamba et al. 2019's 9-layer networks -----------------------------------------------------------------

def _seed000(name: str, channel_relu: bool):
    def make(num_classes: int, in_channels: int, side: int, **_):
        import hpa.nn

        return getattr(hpa.nn, name)(num_classes=num_classes, in_channels=in_channels, input_size=side,
                                     channel_relu=channel_relu)

    return make


# -- Milisavljevic's small CNN (Exploring Convolutional Networks) and its context-widening variants --

def _small(reduction: str):
    """4 x (conv 3x3, 64 filters, padding keeps the size; ReLU; ``reduction``), then one linear layer."""

    def make(num_classes: int, in_channels: int, side: int, **_):
        from torch import nn

        layers: list[nn.Module] = []
        channels = in_channels
        for depth in range(1, 5):
            stride = 2 if reduction == "stride" else 1
            dilation = {"dilation": 2, "dilation_inc": depth + 1}.get(reduction, 1)
            layers += [nn.Conv2d(channels, 64, 3, stride=stride, padding=dilation, dilation=dilation),
                       nn.ReLU(inplace=True)]
            # A pool that would leave nothing (side 1) is left out, so 8x8 digits fit; at Milisavljevic's
            # 28x28 (and at 32x32) all four pools are there.
            if reduction in ("max", "avg", "maxavg") and side >= 2:
                layers.append(_pool(reduction))
                side //= 2
            elif reduction == "stride":
                side = (side - 1) // 2 + 1
            channels = 64
        return _FeaturesClassifier(nn.Sequential(*layers), nn.Sequential(nn.Linear(64 * side * side, num_classes)))

    return make


def _pool(kind: str):
    from torch import nn

    if kind == "max":
        return nn.MaxPool2d(2)
    if kind == "avg":
        return nn.AvgPool2d(2)

    class MaxAvgPool2d(nn.Module):
        """Seed 001's max+average pooling: the mean of a 2x2 max pool and a 2x2 average pool."""

        def forward(self, x):
            return 0.5 * (nn.functional.max_pool2d(x, 2) + nn.functional.avg_pool2d(x, 2))

    return MaxAvgPool2d()


_BUILDERS: dict[str, Callable[..., Any]] = {
    **{name: _torchvision(name) for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    "alexnet": _alexnet,
    **{f"{name}_cifar": _vgg_cifar(name) for name in _VGG_CONFIGS},
    "lenet9": _seed000("lenet9", channel_relu=True),
    "vgg9": _seed000("vgg9", channel_relu=True),
    "lenet9_relu": _seed000("lenet9", channel_relu=False),
    "vgg9_relu": _seed000("vgg9", channel_relu=False),
    "lenet6": _seed000("lenet9", channel_relu=False),
    **{f"small_{kind}": _small(kind) for kind in ("max", "avg", "maxavg", "stride", "dilation", "dilation_inc")},
}

# The initialisation of each family's paper code (see the module docstring).  Looked up by the whole
# name, else by its first part ("vgg19_cifar" has its own entry; "small_max" -> "small").
_INIT_SCHEMES = {
    **{name: "kaiming_conv" for name in _VGG_CONFIGS},  # magamba/hp_arrangements: torchvision's VGG
    "alexnet": "default",  # the same code keeps torchvision's AlexNet as PyTorch initialises it
    **{f"{name}_cifar": "xavier_normal" for name in _VGG_CONFIGS},  # magamba/cones: init 'x_gaussian'
    "lenet9": "xavier_normal", "vgg9": "xavier_normal",
    "lenet9_relu": "xavier_normal", "vgg9_relu": "xavier_normal",
    "lenet6": "xavier_uniform",  # magamba/hp_arrangements: LeNet._initialize_weights
    "small": "kaiming_normal",  # no published code: hpa's choice, which trains these on digits fastest
}
