"""A model with no layer hpa analyses says what it holds, by name and count, for every loader; never "nothing".

Each file is written by the real tool (torch.onnx and onnxruntime's quantizer, torch.jit.script,
torch.save, the MatConvNet exporter of the tests) and refused through the real CLI in one line.
Weighted layers hpa does not analyse beside convs are listed under ``skipped`` with their reason.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import onnx
import torch
from torch import nn

import hpa
import mcn_export as mcn
from conftest import assert_bad_input


class Recurrent(nn.Module):
    """A recurrent layer on features (and token embeddings when given), a linear head: no conv."""

    def __init__(self, conv: bool = False):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.conv = nn.Conv1d(5, 4, 3) if conv else None
        self.head = nn.Linear(5 if not conv else 4, 2)

    def forward(self, x, tokens: Optional[torch.Tensor] = None):
        if tokens is not None:
            x = x + self.embed(tokens)
        out, _ = self.rnn(x)
        if self.conv is not None:
            out = self.conv(out.transpose(1, 2)).transpose(1, 2)
        return self.head(out)


def scripted(tmp_path, module, name="net.pt"):
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def test_onnx_of_integer_matmuls_names_them(tmp_path, run_hpa):
    """quantize_dynamic of an MLP: MatMulInteger nodes only."""
    from onnxruntime.quantization import quantize_dynamic

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    float_path, path = tmp_path / "mlp.onnx", tmp_path / "mlp_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mlp, (torch.randn(1, 12),), str(float_path), dynamo=False)
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(float_path), str(path))
    assert {"MatMulInteger"} == {n.op_type for n in onnx.load(str(path)).graph.node} & {"MatMulInteger", "Gemm",
                                                                                         "MatMul"}
    line = assert_bad_input(run_hpa("scan", path), "no conv layers", "2 MatMulInteger nodes: integer matmul "
                                                                     "(MatMulInteger) is not analysed")
    assert "nothing" not in line


def test_torchscript_of_a_recurrent_model_names_its_calls(tmp_path, run_hpa):
    line = assert_bad_input(run_hpa("scan", scripted(tmp_path, Recurrent())), "no conv layers", "1 linear layer",
                            "1 aten::embedding call: a lookup table", "1 aten::lstm call: recurrent layer")
    assert "nothing" not in line


def test_a_module_of_recurrent_layers_names_them():
    try:
        hpa.load(Recurrent(), input_size=(7, 6))
    except hpa.UnsupportedModelError as error:
        message = str(error)
    else:
        raise AssertionError("a model without convs was accepted")
    assert "1 Embedding module: a lookup table" in message and "1 LSTM module: recurrent layer" in message
    assert "(embed)" in message and "(rnn)" in message


def test_a_state_dict_of_norms_and_embeddings_names_them(tmp_path, run_hpa):
    torch.save({"tok.embedding.weight": torch.randn(20, 6), "ln.weight": torch.ones(6), "ln.bias": torch.zeros(6),
                "layers.0.norm.weight": torch.ones(1, 6)}, tmp_path / "text.pth")
    line = assert_bad_input(run_hpa("scan", tmp_path / "text.pth"), "no conv layers",
                            "2 tensor groups: normalisation layer", "(layers.0.norm, ln)",
                            "1 tensor group: embedding table")
    assert "nothing" not in line


def test_a_matconvnet_file_of_unknown_layers_names_them(tmp_path, run_hpa):
    path = tmp_path / "odd.mat"
    mcn.export_simplenn([{"name": "a", "type": "frobnicate"}, {"name": "b", "type": "frobnicate"}], path,
                        input_size=(3, 8, 8))
    line = assert_bad_input(run_hpa("scan", path), "no conv layers", "2 layers: unknown MatConvNet layer type "
                                                                     "'frobnicate'", "(a, b)")
    assert "nothing" not in line


def test_beside_convs_recurrent_layers_and_lookups_are_listed(tmp_path):
    """Nothing dropped silently: a conv model with an embedding and an LSTM lists both, traced or scripted."""
    torch.manual_seed(0)
    model = Recurrent(conv=True).eval()
    traced = hpa.load(model, input_size=(7, 6))
    reasons = {s.name: s.reason for s in traced.skipped}
    assert reasons == {"embed": "Embedding: a lookup table, not a linear layer of its input; not analysed",
                       "rnn": "LSTM: recurrent layer, not analysed"}
    archive = hpa.load(str(scripted(tmp_path, model)))
    assert [layer.name for layer in archive] == ["conv", "head"]
    reasons = sorted(s.reason for s in archive.skipped)
    assert reasons == ["aten::embedding: a lookup table, not a linear layer of its input; not analysed",
                       "aten::lstm: recurrent layer, not analysed"]
    assert "embed" in {s.name for s in archive.skipped}
