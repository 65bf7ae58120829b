"""One network, every backend: torch (and torchvision:), ONNX with BatchNorm kept or fused, MatConvNet.

All must give the same normalized graph: the same layer count and kinds, the
same attributes, the same (folded) weights and biases element by element (a
kernel read with H and W swapped keeps its cosines but not its weights), and
per-filter cosines equal to within 1e-6.  Because the backends share
``hpa/fold.py``, the reference itself is checked against BatchNorm folding
written from docs/statistics.md §0 with the torch modules' own tensors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import hpa
from mcn_export import export_dagnn, export_simplenn

ATTRIBUTES = ("kind", "stride", "padding", "dilation", "groups", "activation", "out_channels", "in_channels",
              "input_shape", "output_shape")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))  # negative gammas included
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def onnx_export(model: nn.Module, input_size, path, keep_bn: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(1, *input_size), str(path), dynamo=False,
                          do_constant_folding=not keep_bn)
    return str(path)


def cosines(graph) -> dict[str, list]:
    return {name: values["cosines"]
            for name, values in hpa.scan(graph, statistics=["projection"], with_linear=True)
            .statistics["projection"].layers.items()}


def assert_same(reference, other, what: str, *, bn: bool = True, count: int | None = None):
    ref_layers = list(reference)[:count]
    got_layers = list(other)[:count]
    assert len(got_layers) == len(ref_layers), what
    ref_cos, got_cos = cosines(reference), cosines(other)
    for a, b in zip(ref_layers, got_layers):
        for attribute in ATTRIBUTES:
            assert getattr(a, attribute) == getattr(b, attribute), (what, a.name, attribute)
        assert len(a.predecessors) == len(b.predecessors), (what, a.name)
        if bn:
            assert a.bn_folded == b.bn_folded, (what, a.name)
        np.testing.assert_allclose(np.array(got_cos[b.name], dtype=float), np.array(ref_cos[a.name], dtype=float),
                                   atol=1e-6, err_msg=f"{what}: {a.name}")
        np.testing.assert_allclose(b.weight, a.weight, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {a.name} weight")
        if a.bias is not None or b.bias is not None:
            zeros = np.zeros(a.weight.shape[0])
            np.testing.assert_allclose(zeros if b.bias is None else b.bias, zeros if a.bias is None else a.bias,
                                       rtol=1e-5, atol=1e-5, err_msg=f"{what}: {a.name} bias")


def folded_by_the_spec(conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
    """docs/statistics.md §0: ``s = gamma / sqrt(var + eps)``, ``w' = s w``, ``b' = (b - mean) s + beta``."""
    w = conv.weight.detach().double().numpy()
    b = np.zeros(w.shape[0]) if conv.bias is None else conv.bias.detach().double().numpy()
    if bn is None:
        return w, b
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    s = gamma / np.sqrt(var + bn.eps)
    return w * s[:, None, None, None], (b - mean) * s + beta


class Mixed(nn.Sequential):
    """Plain, BatchNorm (negative gammas), depthwise, grouped + dilated convs, asymmetric padding."""

    def __init__(self):
        super().__init__(
            nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(12, 6, 2, stride=2), nn.ReLU(),
        )


def test_mixed_network_is_the_same_graph_in_every_backend(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(Mixed())
    size = (3, 14, 15)
    reference = hpa.load(model, input_size=size)
    assert [l.groups for l in reference] == [1, 8, 2, 1, 1]
    assert reference.layers[0].padding == ((2, 0), (0, 1)) and reference.layers[2].dilation == (2, 2)
    assert [l.bn_folded for l in reference] == [True, True, False, True, False]
    for layer, (conv, bn) in zip(reference, [(model[1], model[2]), (model[4], model[5]), (model[7], None),
                                             (model[10], model[11]), (model[14], None)]):
        weight, bias = folded_by_the_spec(conv, bn)
        np.testing.assert_allclose(layer.weight, weight, rtol=1e-12, atol=0, err_msg=layer.name)
        np.testing.assert_allclose(layer.bias, bias, rtol=1e-12, atol=1e-12, err_msg=layer.name)
    onnx_kept = hpa.load(onnx_export(model, size, tmp_path / "kept.onnx", keep_bn=True))
    onnx_fused = hpa.load(onnx_export(model, size, tmp_path / "fused.onnx", keep_bn=False))
    export_simplenn(model, tmp_path / "simple.mat", input_size=size)
    export_dagnn(model, tmp_path / "dag.mat", input_size=size)
    assert_same(reference, onnx_kept, "onnx, BatchNorm kept")
    assert_same(reference, onnx_fused, "onnx, BatchNorm fused by the exporter", bn=False)
    assert_same(reference, hpa.load(str(tmp_path / "simple.mat")), "matconvnet simplenn")
    assert_same(reference, hpa.load(str(tmp_path / "dag.mat")), "matconvnet dagnn")


def test_torchvision_model_is_the_same_graph_in_every_backend(tmp_path):
    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.vgg11_bn())
    weights = tmp_path / "vgg11_bn.pth"
    torch.save(model.state_dict(), weights)
    size = (3, 32, 32)
    reference = hpa.load("torchvision:vgg11_bn", weights=str(weights), input_size=size)
    assert [l.kind for l in reference] == ["conv2d"] * 8 + ["linear"] * 3
    assert_same(reference, hpa.load(model, input_size=size), "the module itself")
    # The conv part is exported: at 32x32 the classifier's adaptive pooling has no ONNX form, and
    # MatConvNet has no linear layer (its fc layers are convs).
    features = model.features
    assert_same(reference, hpa.load(onnx_export(features, size, tmp_path / "kept.onnx", keep_bn=True)),
                "onnx, BatchNorm kept", count=8)
    assert_same(reference, hpa.load(onnx_export(features, size, tmp_path / "fused.onnx", keep_bn=False)),
                "onnx, BatchNorm fused", bn=False, count=8)
    export_simplenn(features, tmp_path / "vgg.mat", input_size=size)
    assert_same(reference, hpa.load(str(tmp_path / "vgg.mat")), "matconvnet", count=8)


def padding_torch_applies(conv: nn.Conv2d, input_size) -> tuple[tuple[int, int], ...]:
    """The (begin, end) pairs that make F.pad + an unpadded conv equal the module, found by trying them."""
    x = torch.randn(1, *input_size, dtype=torch.float64)
    weight = conv.weight.detach().double()
    with torch.no_grad():
        want = conv.double()(x)
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        for top in range(total[0] + 1):
            for left in range(total[1] + 1):
                pad = (left, total[1] - left, top, total[0] - top)
                got = F.conv2d(F.pad(x, pad), weight, conv.bias.double(), dilation=conv.dilation)
                if got.shape == want.shape and torch.allclose(got, want):
                    return (top, total[0] - top), (left, total[1] - left)
    raise AssertionError("no padding reproduces the module")


def test_torchscript_same_padding_is_the_one_torch_applies(tmp_path):
    """An even kernel with padding="same": the odd extra pixel goes where torch puts it, read from a
    TorchScript archive (its own graph walker, not the tracer)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2)), nn.ReLU()).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    [layer] = list(hpa.load(str(path), input_size=(3, 9, 8)))
    assert layer.padding == padding_torch_applies(model[0], (3, 9, 8))
    np.testing.assert_array_equal(layer.weight, model[0].weight.detach().numpy())


def test_torchscript_keeps_asymmetric_zero_padding(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    [layer] = list(hpa.load(str(path), input_size=(3, 9, 8)))
    assert layer.padding == ((2, 0), (0, 1))  # ZeroPad2d's (left, right, top, bottom) as (begin, end) pairs
