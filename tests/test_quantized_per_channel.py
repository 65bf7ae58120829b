"""A QDQ export quantized per channel: each filter's weights are ``(q - zero_point) * scale`` with its own scale.

README: "analysed from their dequantized weights `(q − zero_point) · scale`, per tensor or per output channel"; per
channel, DequantizeLinear's ``axis`` attribute names the axis the scales run along (0: the filters).
A conv with as many input as output channels makes a scale applied along the wrong axis fit, so only
the numbers can tell.  The file is written by torch.onnx and onnxruntime's quantize_static.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn

import hpa
from test_quantized import Calibration, dequantized, quantized_convs, randomize


def test_per_channel_scales_run_along_the_filters(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                    nn.ReLU(), nn.Conv2d(4, 2, 1)), seed=3)
    float_path, qdq = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 10, 10),), str(float_path), dynamo=False, input_names=["x"])
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(float_path), str(qdq), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8)
    graph = hpa.load(str(qdq))
    convs = quantized_convs(qdq)
    assert len(graph) == len(convs) == 3
    square = convs[1]
    assert square["q"].shape[:2] == (4, 4) and np.asarray(square["scale"]).size == 4
    assert len(set(np.asarray(square["scale"]).tolist())) == 4  # four different scales: their axis matters
    for layer, conv in zip(graph, convs):
        np.testing.assert_allclose(layer.weight, dequantized(conv), rtol=1e-6, atol=1e-9, err_msg=layer.name)
        assert layer.quantization["per_channel"] is True
