"""Bare state_dicts: the same tensors give the same graph in every file format, equal to the
traced module's; BatchNorms are folded only where the names pair them with certainty."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

import hpa
from hpa.backends.state_dict import INFERRED_NOTE_KEY, module_order

INPUT = (3, 32, 32)
MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(weights=None),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
}
FORMATS = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def randomise_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Inference statistics far from identity, and about half the gammas negative (flipped hyperplanes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
                module.weight.copy_(sign * (torch.rand(n, generator=generator) + 0.5))
                module.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


def save(state: dict, path) -> None:
    """One file format per suffix; .pt stores the keys shuffled, as no format promises an order."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif path.suffix == ".pt":
        keys = list(state)
        random.Random(0).shuffle(keys)
        torch.save({k: state[k] for k in keys}, path)
    elif path.suffix == ".bin":  # the legacy (pre-zip) torch.save format
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "epoch": 7, "hyper_parameters": {"lr": 0.1}}, path)
    else:
        torch.save(state, path)


def projection(spec, **kwargs):
    result = hpa.scan(spec, statistics=["projection"], with_linear=True, **kwargs)
    return result.graph, result.statistics["projection"].layers


@pytest.fixture(scope="module")
def traced():
    """name -> (model, traced graph, projection per layer), built once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = randomise_batchnorms(MODELS[name](), seed=1)
            cache[name] = (model, *projection(model, input_size=INPUT))
        return cache[name]

    return get


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_format_gives_the_traced_modules_numbers(tmp_path, traced, name, suffix):
    model, truth_graph, truth = traced(name)
    path = tmp_path / f"weights{suffix}"
    save(model.state_dict(), path)
    graph, found = projection(path)
    assert [layer.name for layer in graph] == [layer.name for layer in truth_graph]
    for layer in truth_graph:
        assert graph[layer.name].bn_folded == layer.bn_folded, layer.name
        assert found[layer.name]["n_l"] == truth[layer.name]["n_l"], layer.name
        np.testing.assert_allclose(found[layer.name]["cosines"], truth[layer.name]["cosines"], atol=1e-6,
                                   err_msg=layer.name)
    assert not [s for s in graph.skipped if "BatchNorm" in s.reason]


def test_formats_agree_and_negative_gammas_flip_cosines(tmp_path, traced):
    """The numbers really depend on which BatchNorm is folded: raw weights differ from folded ones."""
    model, _, truth = traced("resnet18")
    graphs = []
    for suffix in FORMATS:
        save(model.state_dict(), tmp_path / f"w{suffix}")
        graphs.append(hpa.load(tmp_path / f"w{suffix}"))
    for graph in graphs[1:]:
        assert [l.name for l in graph] == [l.name for l in graphs[0]]
        for a, b in zip(graph, graphs[0]):
            np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12)
    _, raw = projection(tmp_path / "w.pth", fold_bn=False)
    flipped = [n for n in truth if truth[n]["n_l"] != raw[n]["n_l"]]
    assert len(flipped) >= 15


def test_folded_layers_name_their_tensors_and_what_was_inferred(tmp_path, traced):
    model, _, _ = traced("efficientnet_b0")
    save(model.state_dict(), tmp_path / "w.safetensors")
    graph = hpa.load(tmp_path / "w.safetensors")
    stem, head = graph["conv_stem"], graph["conv_head"]
    assert stem.params == {"weight": "conv_stem.weight", "bn.weight": "bn1.weight", "bn.bias": "bn1.bias",
                           "bn.running_mean": "bn1.running_mean", "bn.running_var": "bn1.running_var",
                           "bn.eps": 1e-5}
    assert head.params["bn.running_var"] == "bn2.running_var"
    assert graph["blocks.1.0.conv_dw"].params["bn.weight"] == "blocks.1.0.bn2.weight"
    assert graph["blocks.1.0.conv_pwl"].params["bn.weight"] == "blocks.1.0.bn3.weight"
    assert graph["classifier"].params == {"weight": "classifier.weight", "bias": "classifier.bias"}
    for layer in graph:
        assert {"kind", "activation", "predecessors", "bn_folded"} <= set(layer.inferred)
        assert layer.stride is None or layer.kind == "linear"
    assert "torchvision:NAME --weights FILE" in graph.source[INFERRED_NOTE_KEY]
    assert graph["conv_stem"].attributes()["inferred"] == list(stem.inferred)


def test_a_module_graph_reads_everything():
    graph = hpa.load(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), input_size=(3, 8, 8))
    assert graph["0"].inferred == () and INFERRED_NOTE_KEY not in graph.source


def batchnorm(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(n, generator=g), "bias": torch.randn(n, generator=g),
            "running_mean": torch.randn(n, generator=g), "running_var": torch.rand(n, generator=g) + 0.5}


def state(**groups) -> dict[str, torch.Tensor]:
    return {f"{prefix.replace('__', '.')}.{leaf}": value
            for prefix, tensors in groups.items() for leaf, value in tensors.items()}


def test_batchnorm_that_names_cannot_pair_is_listed_with_the_fix(tmp_path):
    # DenseNet-style pre-activation names: norm1 acts on conv1's *input*; nothing pairs norm with conv.
    sd = state(block__norm1=batchnorm(8), block__conv1={"weight": torch.randn(8, 8, 3, 3)},
               block__norm2=batchnorm(8, 1), block__conv2={"weight": torch.randn(8, 8, 3, 3)})
    save_file(sd, str(tmp_path / "dense.safetensors"))
    graph = hpa.load(tmp_path / "dense.safetensors")
    assert [l.name for l in graph] == ["block.conv1", "block.conv2"]
    assert not any(l.bn_folded for l in graph)
    reasons = {s.name: s.reason for s in graph.skipped}
    for bn in ("block.norm1", "block.norm2"):
        assert "not folded" in reasons[bn] and "timm:NAME --weights FILE" in reasons[bn]
        assert "hpa.scan(module)" in reasons[bn]


def test_batchnorm_with_other_channels_is_not_folded(tmp_path):
    sd = state(conv1={"weight": torch.randn(8, 3, 3, 3)}, bn1=batchnorm(6))
    torch.save(sd, tmp_path / "w.pth")
    graph = hpa.load(tmp_path / "w.pth")
    assert not graph["conv1"].bn_folded
    assert "6 channels" in {s.name: s.reason for s in graph.skipped}["bn1"]


def test_sequential_batchnorm_after_an_activation_is_not_folded(tmp_path):
    # Sequential(conv, relu, bn): index 2 does not directly follow the conv at 0.
    sd = state(features__0={"weight": torch.randn(4, 3, 3, 3)}, features__2=batchnorm(4))
    torch.save(sd, tmp_path / "w.pth")
    graph = hpa.load(tmp_path / "w.pth")
    assert not graph["features.0"].bn_folded and graph.skipped[0].name == "features.2"


def test_no_fold_bn_lists_the_batchnorms(tmp_path):
    sd = state(conv={"weight": torch.randn(4, 3, 3, 3)}, bn=batchnorm(4))
    torch.save(sd, tmp_path / "w.pth")
    graph = hpa.load(tmp_path / "w.pth", fold_bn=False)
    np.testing.assert_array_equal(graph["conv"].weight, sd["conv.weight"].numpy())
    assert "--no-fold-bn" in {s.name: s.reason for s in graph.skipped}["bn"]


def test_transposed_conv_by_name_folds_along_its_output_axis(tmp_path):
    deconv = nn.ConvTranspose2d(4, 6, 3)
    model = randomise_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), deconv, nn.BatchNorm2d(6)), 2)
    truth = hpa.load(model, input_size=(3, 8, 8))
    sd = {k.replace("2.", "up.deconv.").replace("3.", "up.bn."): v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    graph = hpa.load(tmp_path / "w.safetensors")
    layer = graph["up.deconv"]
    assert layer.kind == "conv_transpose2d" and "kind" in layer.inferred and layer.out_channels == 6
    assert layer.bn_folded
    np.testing.assert_allclose(layer.weight, truth["2"].weight, rtol=1e-12)
    np.testing.assert_allclose(layer.bias, truth["2"].bias, rtol=1e-12, atol=1e-12)


def test_transposed_conv_from_the_checkpoints_module_classes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3))
    torch.save({"model": model.state_dict(), "arch": str(model)}, tmp_path / "w.ckpt")
    graph = hpa.load(tmp_path / "w.ckpt")
    assert graph["2"].kind == "conv_transpose2d" and "kind" not in graph["2"].inferred
    assert graph["0"].kind == "conv2d" and "kind" not in graph["0"].inferred
    torch.save({"model": model.state_dict()}, tmp_path / "bare.ckpt")
    unknown = hpa.load(tmp_path / "bare.ckpt")["2"]
    assert unknown.kind == "conv2d" and "kind" in unknown.inferred  # the guess is recorded, not hidden


def test_module_repr_with_repeated_blocks_is_parsed():
    from hpa.backends.torch_files import parse_module_repr

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(*[nn.ConvTranspose2d(4, 4, 3) for _ in range(3)]))
    classes = parse_module_repr(str(model))
    assert classes["0"] == "Conv2d" and classes["1"] == "Sequential"
    assert [classes[f"1.{i}"] for i in range(3)] == ["ConvTranspose2d"] * 3


def test_checkpoint_with_several_weight_sets(tmp_path):
    main, ema = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 3))
    torch.save({"model": main.state_dict(), "model_ema": ema.state_dict(), "epoch": 1}, tmp_path / "w.pth")
    graph = hpa.load(tmp_path / "w.pth")
    assert graph.source["checkpoint_key"] == "model"
    assert graph.source["checkpoint_keys"] == ["model", "model_ema"]
    np.testing.assert_array_equal(graph["0"].weight, main[0].weight.detach().numpy())
    chosen = hpa.load(tmp_path / "w.pth", checkpoint_key="model_ema")
    assert chosen.source["checkpoint_key"] == "model_ema"
    np.testing.assert_array_equal(chosen["0"].weight, ema[0].weight.detach().numpy())
    with pytest.raises(hpa.HpaError, match="model, model_ema"):
        hpa.load(tmp_path / "w.pth", checkpoint_key="teacher")


def test_module_order_is_execution_order_for_known_layouts():
    names = ["blocks.0.0.conv_pw", "classifier", "conv_head", "conv_stem", "blocks.0.0.se.conv_expand",
             "blocks.0.0.se.conv_reduce", "blocks.10.0.conv_dw", "blocks.2.0.conv_dw", "blocks.0.0.conv_dw",
             "blocks.0.0.conv_pwl"]
    assert module_order(names) == [
        "conv_stem", "blocks.0.0.conv_pw", "blocks.0.0.conv_dw", "blocks.0.0.se.conv_reduce",
        "blocks.0.0.se.conv_expand", "blocks.0.0.conv_pwl", "blocks.2.0.conv_dw", "blocks.10.0.conv_dw",
        "conv_head", "classifier"]
    assert module_order(["fc", "layer1.0.conv1", "conv1", "layer10.0.conv1", "layer2.0.conv1"]) == [
        "conv1", "layer1.0.conv1", "layer2.0.conv1", "layer10.0.conv1", "fc"]


class NamedBlock(nn.Module):
    """Res2Net's parallel lists (convs.i, bns.i), GhostNet's conv_dw/bn_dw, timm's conv/bn1."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(2)])
        self.conv_dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn_dw = nn.BatchNorm2d(4)
        self.tail = nn.Module()
        self.tail.conv, self.tail.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        x = torch.relu(self.bn_dw(self.conv_dw(x)))
        return torch.relu(self.tail.bn1(self.tail.conv(x)))


def test_parallel_lists_and_matching_names_pair_like_the_trace(tmp_path):
    model = randomise_batchnorms(NamedBlock(), seed=3)
    truth = hpa.load(model, input_size=(4, 6, 6))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    graph = hpa.load(tmp_path / "w.safetensors")
    # Names cannot tell that convs run before conv_dw here, so only the set of layers is compared.
    assert sorted(l.name for l in graph) == sorted(l.name for l in truth) == ["conv_dw", "convs.0", "convs.1",
                                                                              "tail.conv"]
    for layer in truth:
        assert layer.bn_folded and graph[layer.name].bn_folded
        np.testing.assert_allclose(graph[layer.name].weight, layer.weight, rtol=1e-12)
    assert graph["conv_dw"].params["bn.weight"] == "bn_dw.weight"
    assert graph["tail.conv"].params["bn.weight"] == "tail.bn1.weight"
