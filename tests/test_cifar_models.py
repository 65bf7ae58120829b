"""The ``cifar:`` loader: one name for listing, scanning and training the papers' networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hpa
from conftest import assert_bad_input
from hpa.options import LoadOptions

NAMES = hpa.list_models("cifar")
# conv layers each network runs, counted from its definition (torchvision's cfgs, seeds 000/001)
CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16, "alexnet": 5, "lenet6": 6, "lenet9": 6, "vgg9": 6,
         "lenet9_relu": 6, "vgg9_relu": 6, **{f"vgg{d}_cifar": n for d, n in ((11, 8), (13, 10), (16, 13), (19, 16))},
         **{f"small_{k}": 4 for k in ("max", "avg", "maxavg", "stride", "dilation", "dilation_inc")}}


def build(name, num_classes=10, input_size=(3, 32, 32), seed=0):
    from hpa.plugins import registries

    loader = registries()["loaders"].get("cifar")
    return loader.build(name, LoadOptions(weights="none", input_size=input_size, seed=seed,
                                          extra={"num_classes": num_classes}))


def test_every_listed_model_is_covered():
    assert sorted(CONVS) == NAMES


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("vgg11", "vgg13", "vgg16")])
def test_builds_trains_and_traces(name):
    model = build(name, num_classes=7)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()  # trainable end to end
    graph = hpa.load(model, input_size=(3, 32, 32))
    convs = [layer for layer in graph if layer.kind == "conv2d"]
    assert len(convs) == CONVS[name]
    assert graph.layers[-1].out_channels == 7


def test_vgg19_is_torchvision_vgg19_without_batchnorm():
    import torchvision

    ours = build("vgg19", num_classes=10).state_dict()
    reference = torchvision.models.vgg19(weights=None, num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_alexnet_upscales_small_inputs_and_keeps_torchvision_names():
    import torchvision

    model = build("alexnet")
    assert set(model.state_dict()) == set(torchvision.models.alexnet(weights=None).state_dict())
    first = hpa.load(model, input_size=(3, 32, 32)).layers[0]
    assert first.input_shape == (3, 64, 64)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build("small_max", seed=1), build("small_max", seed=1), build("small_max", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["features.0.weight"], c.state_dict()["features.0.weight"])


def test_seed001_variants_differ_only_in_the_context_method():
    def convs(name):
        return [m for m in build(name).modules() if isinstance(m, nn.Conv2d)]

    assert [c.stride for c in convs("small_stride")] == [(2, 2)] * 4
    assert [c.dilation for c in convs("small_dilation")] == [(2, 2)] * 4
    assert [c.dilation[0] for c in convs("small_dilation_inc")] == [2, 3, 4, 5]
    assert [c.stride for c in convs("small_max")] == [(1, 1)] * 4
    pools = {name: [type(m).__name__ for m in build(name).features if not isinstance(m, (nn.Conv2d, nn.ReLU))]
             for name in ("small_max", "small_avg", "small_maxavg")}
    assert pools == {"small_max": ["MaxPool2d"] * 4, "small_avg": ["AvgPool2d"] * 4,
                     "small_maxavg": ["MaxAvgPool2d"] * 4}
    pool = build("small_maxavg").features[2]
    x = torch.randn(1, 2, 4, 4)
    expected = 0.5 * (nn.functional.max_pool2d(x, 2) + nn.functional.avg_pool2d(x, 2))
    assert torch.allclose(pool(x), expected)


def test_seed000_networks_use_the_channel_relu_conv():
    from hpa.nn import ChannelReLUConv2d

    assert sum(isinstance(m, ChannelReLUConv2d) for m in build("lenet9").modules()) == 6
    assert sum(isinstance(m, ChannelReLUConv2d) for m in build("lenet9_relu").modules()) == 0


@pytest.mark.parametrize("name,size", [("vgg11", (1, 32, 32)), ("lenet6", (1, 28, 28)), ("small_max", (1, 8, 8))])
def test_grayscale_and_smaller_inputs_fit(name, size):
    model = build(name, input_size=size)
    assert model(torch.randn(2, *size)).shape == (2, 10)


def test_too_small_input_is_refused():
    with pytest.raises(hpa.HpaError, match="at least 32x32"):
        build("vgg19_cifar", input_size=(1, 28, 28))


def test_scan_and_list_share_the_names(run_hpa, tmp_path):
    listed = run_hpa("list-models", "cifar", "small_*")
    assert listed.returncode == 0 and "small_dilation_inc" in listed.stdout.split()
    proc = run_hpa("scan", "cifar:small_max", "--weights", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert [layer["name"] for layer in layers][:4] == ["features.0", "features.3", "features.6", "features.9"]
    assert_bad_input(run_hpa("scan", "cifar:vgg91", "--weights", "none"), "did you mean", "cifar:vgg19")
    assert_bad_input(run_hpa("scan", "cifar:vgg19"), "--weights none")


def test_weights_file_is_loaded_into_the_architecture(tmp_path):
    from safetensors.torch import save_file

    model = build("small_avg", seed=4)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    graph = hpa.load("cifar:small_avg", weights=str(path))
    np.testing.assert_array_equal(graph["features.3"].weight, model.state_dict()["features.3.weight"].numpy())
