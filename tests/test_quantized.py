"""Quantized convs: ONNX models quantized by onnxruntime's own quantizer, and torch.ao quantized modules.

Fixtures come from the real tools: a small torch model exported by ``torch.onnx.export``, then
quantized by ``onnxruntime.quantization`` (``quantize_dynamic``: ConvInteger; ``quantize_static`` in
QOperator format: QLinearConv, and in QDQ format: DequantizeLinear -> Conv), and the same model
quantized by ``torch.ao.quantization`` and saved as a state_dict and as TorchScript.

What is checked, each against a computation made here from the file's own tensors:

* hpa's weights are the dequantized ones, ``(q - zero_point) * scale``, and ``n_l`` and the cosines
  are those of that dequantized model (to 1e-6);
* against the float model that was quantized, every cosine is within the quantization error.  The
  bound: rounding moves each weight of filter ``i`` by at most half a step ``s_i / 2``, so the filter
  moves by ``||e_i|| <= s_i sqrt(n) / 2`` and turns by at most ``arcsin(||e_i|| / ||w_i||)``; a cosine
  with the all-ones direction is 1-Lipschitz in that angle, so
  ``|c_q - c_float| <= arcsin(min(1, s_i sqrt(n) / (2 ||w_i||)))``.  The tests check the premise
  (no weight moved by more than half a step) on the file itself.
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import hpa
from conftest import assert_bad_input


def randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(0.2 * torch.randn(m.weight.shape, generator=g) + 0.08 * torch.randn(
                    m.weight.shape[0], *([1] * (m.weight.ndim - 1)), generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return module.eval()


def small_cnn() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)), seed=0)


class Calibration:
    """onnxruntime's CalibrationDataReader protocol: a few input batches, then None."""

    def __init__(self, batches: int = 4):
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.standard_normal((1, 3, 10, 10)).astype(np.float32)} for _ in range(batches)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """The float export and its three quantized forms, written by torch.onnx and onnxruntime."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    folder = tmp_path_factory.mktemp("quantized")
    float_path = folder / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small_cnn(), (torch.randn(1, 3, 10, 10),), str(float_path), dynamo=False,
                          input_names=["x"])  # constant folding fuses the BatchNorm into the first conv
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process the model
    paths = {"float": float_path, "dynamic": folder / "dynamic.onnx", "qoperator": folder / "qoperator.onnx",
             "qdq": folder / "qdq.onnx"}
    # asymmetric uint8 weights (zero points far from 0) per tensor; int8 per channel; uint8 per tensor
    quantize_dynamic(str(float_path), str(paths["dynamic"]), weight_type=QuantType.QUInt8)
    quantize_static(str(float_path), str(paths["qoperator"]), Calibration(), quant_format=QuantFormat.QOperator,
                    per_channel=True, weight_type=QuantType.QInt8)
    quantize_static(str(float_path), str(paths["qdq"]), Calibration(), quant_format=QuantFormat.QDQ,
                    per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    return paths


# -- the file's own numbers, read here with onnx's numpy_helper -----------------------------------------

def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def quantized_convs(path) -> list[dict]:
    """Per quantized conv, in node order: q, scale, zero point, and the float weight's name."""
    model = onnx.load(str(path))
    values = initializers(path)
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type == "ConvInteger":  # the weight's scale is onnxruntime's "<name>_scale"
            q_name = node.input[1]
            found.append(dict(q=values[q_name], zero=values[node.input[3]],
                              scale=values[q_name.replace("_quantized", "_scale")], q_name=q_name))
        elif node.op_type == "QLinearConv":
            found.append(dict(q=values[node.input[3]], scale=values[node.input[4]], zero=values[node.input[5]],
                              q_name=node.input[3], x_scale=values[node.input[1]], b_q=values[node.input[8]]))
        elif node.op_type == "Conv" and node.input[1] in producer:
            dq = producer[node.input[1]]
            found.append(dict(q=values[dq.input[0]], scale=values[dq.input[1]], zero=values[dq.input[2]],
                              q_name=dq.input[0]))
    for conv in found:
        conv["float_name"] = conv["q_name"].removesuffix("_quantized")
    return found


def per_filter(value: np.ndarray, filters: int) -> np.ndarray:
    value = np.asarray(value, np.float64).reshape(-1)
    return np.broadcast_to(value, (filters,)) if value.size == 1 else value


def dequantized(conv: dict) -> np.ndarray:
    q = conv["q"].astype(np.float64)
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q - per_filter(conv["zero"], len(q)).reshape(shape)) * per_filter(conv["scale"], len(q)).reshape(shape)


def numbers(weight: np.ndarray) -> tuple[float, np.ndarray]:
    flat = np.asarray(weight, np.float64).reshape(len(weight), -1)
    cosines = flat.sum(1) / (np.linalg.norm(flat, axis=1) * np.sqrt(flat.shape[1]))
    return float(np.mean(cosines <= 0)), cosines


def projection(graph) -> dict:
    return hpa.analyse(graph, statistics=["projection"]).statistics["projection"].layers


FORMATS = {"dynamic": ("ConvInteger", "uint8", False), "qoperator": ("QLinearConv", "int8", True),
           "qdq": ("DequantizeLinear", "uint8", False)}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_weights_are_dequantized_and_numbers_are_the_dequantized_models(onnx_files, kind):
    graph = hpa.load(str(onnx_files[kind]))
    convs = quantized_convs(onnx_files[kind])
    assert len(graph) == len(convs) == 3
    if kind == "dynamic":
        assert all(np.any(np.asarray(c["zero"]) != 0) for c in convs)  # the zero points matter
    values = projection(graph)
    fmt, dtype, per_channel = FORMATS[kind]
    for layer, conv in zip(graph, convs):
        want = dequantized(conv)
        np.testing.assert_allclose(layer.weight, want, rtol=1e-6, atol=1e-9, err_msg=layer.name)
        n_l, cosines = numbers(want)
        assert values[layer.name]["n_l"] == pytest.approx(n_l, abs=1e-6)
        np.testing.assert_allclose(np.array(values[layer.name]["cosines"], float), cosines, atol=1e-6)
        assert layer.quantization == {"format": fmt, "dtype": dtype, "per_channel": per_channel}
    assert [layer.name for layer in graph][1:] == ["3", "5"]  # onnxruntime's "3.weight_quantized" names "3"
    # the ReLUs: explicit after ConvInteger, folded into the output quantizer's range by quantize_static
    assert [layer.activation for layer in graph] == ["relu", "relu", "none"]
    assert graph["5"].predecessors == ("3",)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_cosines_are_within_the_quantization_error_of_the_float_model(onnx_files, kind):
    graph = hpa.load(str(onnx_files[kind]))
    floats = initializers(onnx_files["float"])
    values = projection(graph)
    bounds = []
    for layer, conv in zip(graph, quantized_convs(onnx_files[kind])):
        w = np.asarray(floats[conv["float_name"]], np.float64)
        step = per_filter(conv["scale"], len(w))
        moved = np.abs(w - dequantized(conv)).reshape(len(w), -1).max(1)
        assert np.all(moved <= step / 2 * (1 + 1e-5)), layer.name  # the premise of the bound
        n = w[0].size
        bound = np.arcsin(np.minimum(1.0, step * np.sqrt(n) / (2 * np.linalg.norm(w.reshape(len(w), -1), axis=1))))
        _, float_cosines = numbers(w)
        got = np.array(values[layer.name]["cosines"], float)
        assert np.all(np.abs(got - float_cosines) <= bound + 1e-9), (layer.name, np.abs(got - float_cosines), bound)
        bounds.extend(bound)
    # 8-bit weights of 6 to 72 inputs: most bounds are a few hundredths (a per-tensor step is coarse for
    # the filters of small norm), so the check has teeth
    assert np.median(bounds) < 0.1, np.round(bounds, 3)


def test_biases_are_the_float_models_within_their_quantization(onnx_files):
    floats = initializers(onnx_files["float"])
    bias_names = {"3": "3.bias", "5": "5.bias"}
    dynamic = hpa.load(str(onnx_files["dynamic"]))
    for name, bias in bias_names.items():  # ConvInteger: the float bias is added after the rescale
        np.testing.assert_allclose(dynamic[name].bias, floats[bias], rtol=1e-6)
    static = hpa.load(str(onnx_files["qoperator"]))
    for conv, layer in zip(quantized_convs(onnx_files["qoperator"]), static):
        step = float(conv["x_scale"]) * per_filter(conv["scale"], len(conv["q"]))  # the int32 bias's unit
        np.testing.assert_allclose(layer.bias, conv["b_q"] * step, rtol=1e-6)
        if layer.name in bias_names:
            assert np.all(np.abs(layer.bias - floats[bias_names[layer.name]]) <= step / 2 * (1 + 1e-5))


def test_result_json_and_table_say_the_layers_were_quantized(onnx_files, run_hpa, tmp_path):
    proc = run_hpa("scan", onnx_files["qoperator"], "--stat", "projection", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: 3 of 3 layers were stored quantized (QLinearConv); they are analysed from their "
                     "dequantized weights, (q - zero_point) * scale"]
    layers = json.loads((tmp_path / "out" / "result.json").read_text())["layers"]
    assert [entry["quantization"]["format"] for entry in layers] == ["QLinearConv"] * 3
    float_run = run_hpa("scan", onnx_files["float"], "--stat", "projection", "--json")
    assert all(entry["quantization"] == {} for entry in json.loads(float_run.stdout)["layers"])


def test_conv_integer_with_a_zero_point_of_the_wrong_shape_is_one_line(onnx_files, run_hpa, tmp_path):
    model = onnx.load(str(onnx_files["dynamic"]))
    zero = next(t for t in model.graph.initializer if t.name == "3.weight_zero_point")
    zero.CopyFrom(numpy_helper.from_array(np.array([120, 128, 130], np.uint8), "3.weight_zero_point"))  # 6 filters
    path = tmp_path / "bad_zero.onnx"
    onnx.save(model, str(path))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_bad_input(run_hpa("scan", path, "--out", tmp_path / "out"), "ConvInteger", "zero point",
                     "shape [3]", "one per output channel (6)")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_conv_integer_whose_scale_cannot_be_found_is_skipped_with_the_reason(onnx_files, tmp_path):
    """Without the rescale after it, ConvInteger's units are unknown: listed, never guessed."""
    model = onnx.load(str(onnx_files["dynamic"]))
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.input[0].startswith("/3/"))
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and cast.output[0] in n.input)
    mul.op_type = "Add"  # the product becomes a sum: no scale to read
    path = tmp_path / "no_scale.onnx"
    onnx.save(model, str(path))
    graph = hpa.load(str(path))
    assert [layer.name for layer in graph] == ["/0/Conv_quant", "5"]
    reasons = {s.name: s.reason for s in graph.skipped}
    assert reasons == {"/3/Conv_quant": "ConvInteger: the scale of its weights is not a constant factor of the Mul "
                                        "after it (ConvInteger -> Cast -> Mul); not analysed"}


def _edit_dynamic(model):
    """ConvInteger "3" reads the weight's zero point as its input's: not the quantizer's own."""
    conv = next(n for n in model.graph.node if n.op_type == "ConvInteger" and n.input[1] == "3.weight_quantized")
    conv.input[2] = "3.weight_zero_point"
    return "/3/Conv_quant"


def _edit_scale_shape(model):
    """The weight scale of "5" becomes one value per channel, but shaped (C,): it would scale the width."""
    scale = next(t for t in model.graph.initializer if t.name == "5.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full(4, 0.01, np.float32), "5.weight_scale"))
    return "/5/Conv_quant"


def _runtime_scale(model, position):
    """QLinearConv "3" reads input ``position`` (1: its input scale, 4: its weight scale) from a graph input."""
    model.graph.input.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []))
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv" and n.input[3] == "3.weight_quantized")
    conv.input[position] = "s"
    return "/3/Conv_quant"


UNREADABLE = {  # case -> (file, edit, the reason hpa gives)
    "input zero point of another quantizer": (
        "dynamic", _edit_dynamic, "ConvInteger: its input is not quantized by a DynamicQuantizeLinear or "
        "QuantizeLinear whose scale and zero point it uses; not analysed"),
    "weight scale of another shape": (
        "dynamic", _edit_scale_shape, "ConvInteger: the weight scale after it has shape [4], not one value per "
        "output channel"),
    "input scale at run time": (
        "qoperator", lambda m: _runtime_scale(m, 1), "QLinearConv: its input scale 's' is not one constant, so its "
        "int32 bias cannot be dequantized; not analysed"),
    "weight scale at run time": (
        "qoperator", lambda m: _runtime_scale(m, 4), "QLinearConv: its weight scale 's' is computed at run time, "
        "not a constant; not analysed"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_quantized_convs_that_cannot_be_read_are_skipped_with_the_reason(onnx_files, tmp_path, case):
    kind, edit, expected = UNREADABLE[case]
    model = onnx.load(str(onnx_files[kind]))
    name = edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    graph = hpa.load(str(path))
    assert len(graph) == 2 and name not in graph
    assert [(s.name, s.reason) for s in graph.skipped] == [(name, expected)]


# -- torch.ao quantized modules: a state_dict and TorchScript ---------------------------------------------

class QuantizableCNN(nn.Module):
    def __init__(self):
        super().__init__()
        import torch.ao.quantization as tq

        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.dequant(self.conv2(self.relu(self.conv1(self.quant(x)))))


@pytest.fixture(scope="module")
def torch_quantized(tmp_path_factory):
    import torch.ao.quantization as tq

    model = randomize(QuantizableCNN(), seed=5)
    model.qconfig = tq.get_default_qconfig("x86")
    tq.fuse_modules(model, [["conv1", "relu"]], inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        prepared = tq.prepare(model)
        prepared(torch.randn(8, 3, 10, 10))
        quantized = tq.convert(prepared)
        folder = tmp_path_factory.mktemp("torch_quantized")
        torch.save(quantized.state_dict(), folder / "state.pt")
        torch.jit.save(torch.jit.script(quantized), str(folder / "scripted.pt"))
    return quantized, folder


def _dequantized_torch(module) -> np.ndarray:
    return module.weight().dequantize().double().numpy()


@pytest.mark.parametrize("file", ["state.pt", "scripted.pt"])
def test_torch_quantized_convs_are_dequantized(torch_quantized, file):
    quantized, folder = torch_quantized
    graph = hpa.load(str(folder / file))
    assert [layer.name for layer in graph] == ["conv1", "conv2"]
    values = projection(graph)
    for layer, module in zip(graph, (quantized.conv1, quantized.conv2)):
        want = _dequantized_torch(module)
        np.testing.assert_allclose(layer.weight, want, rtol=1e-6)
        n_l, cosines = numbers(want)
        assert values[layer.name]["n_l"] == pytest.approx(n_l, abs=1e-6)
        np.testing.assert_allclose(np.array(values[layer.name]["cosines"], float), cosines, atol=1e-6)
        assert layer.quantization["dtype"] == "qint8" and layer.quantization["per_channel"]
        np.testing.assert_allclose(layer.bias, module.bias().detach().numpy(), rtol=1e-6)
    if file == "scripted.pt":  # TorchScript keeps the call structure: the fused ReLU and the strides
        assert [layer.activation for layer in graph] == ["relu", "none"]
        assert graph["conv1"].padding == ((1, 1), (1, 1)) and graph["conv2"].predecessors == ("conv1",)
        assert graph["conv1"].quantization["format"] == "quantized::conv2d_relu"


def test_a_quantized_linear_in_a_state_dict_is_read_from_its_packed_parameters(tmp_path):
    """torch.ao stores a quantized Linear as a (weight, bias) tuple under _packed_params: a layer, not dropped."""
    import torch.ao.quantization as tq

    model = nn.Sequential(tq.QuantStub(), nn.Flatten(), nn.Linear(12, 5), tq.DeQuantStub())
    randomize(model, seed=6)
    model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(torch.randn(8, 12))
        quantized = tq.convert(prepared)
        state = quantized.state_dict()
        assert isinstance(state["2._packed_params._packed_params"], tuple)
        torch.save(state, tmp_path / "linear.pt")
    # no conv, so hpa.load refuses it: read the state_dict's graph directly
    from hpa.backends.state_dict import graph_from_state_dict
    from hpa.backends.torch_files import read_state_dict
    from hpa.backends.torch_trace import to_numpy

    graph = graph_from_state_dict(read_state_dict(tmp_path / "linear.pt"), to_numpy)
    assert [(layer.name, layer.kind) for layer in graph] == [("2", "linear")]
    np.testing.assert_allclose(graph["2"].weight, quantized[2].weight().dequantize().numpy(), rtol=1e-6)
    assert graph["2"].quantization["dtype"] == "qint8"
