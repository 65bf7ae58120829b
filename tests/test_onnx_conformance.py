"""Conformance with ONNX's own conv test data (issue 3 item 5).

For every conv case the installed onnx package ships, the conv is rebuilt from
the normalized graph alone (weight, bias, stride, (begin, end) padding pairs,
dilation, groups, output padding) with ``torch.nn.functional`` and run on the
shipped input; the result must match the shipped expected output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnx
import torch
F = torch.nn.functional

import hpa  # noqa: E402

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
# Case folders: the PyTorch-converted conv cases and, where the package ships them, the node tests.
_PATTERNS = [("pytorch-converted", "test_Conv*"), ("node", "test_conv*"), ("node", "test_convtranspose*")]
# Node-test cases that are not a conv with constant weights: name -> reason.
_NOT_APPLICABLE: dict[str, str] = {}


def _cases() -> list[Path]:
    found = []
    for folder, pattern in _PATTERNS:
        if (DATA / folder).is_dir():
            found += sorted(p for p in (DATA / folder).glob(pattern) if (p / "model.onnx").is_file())
    return found


CASES = _cases()


def test_there_are_cases():
    assert len(CASES) > 0, f"no conv test data under {DATA}"
    dims = {p.name for p in CASES}
    for needle in ("Conv1d", "Conv2d", "Conv3d"):
        assert any(needle in name for name in dims), f"no {needle} case found"


def _tensor(path: Path) -> np.ndarray:
    from onnx import numpy_helper

    proto = onnx.TensorProto()
    proto.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(proto).copy()


def run_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's computation rebuilt from the graph attributes alone."""
    dims = layer.spatial_dims
    weight = torch.from_numpy(np.asarray(layer.weight, np.float64))
    bias = None if layer.bias is None else torch.from_numpy(np.asarray(layer.bias, np.float64))
    x = x.double()
    if not layer.transposed:
        pads = [p for pair in reversed(layer.padding) for p in pair]  # F.pad: last dim first
        x = F.pad(x, pads)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        return conv(x, weight, bias, stride=layer.stride, padding=0, dilation=layer.dilation,
                    groups=layer.groups)
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    y = conv_t(x, weight, bias, stride=layer.stride, padding=0, output_padding=0,
               groups=layer.groups, dilation=layer.dilation)
    # (begin, end) padding crops the full output; output padding adds rows at the end.
    for axis, ((begin, end), extra) in enumerate(zip(layer.padding, layer.output_padding)):
        axis += 2
        if extra:
            shape = list(y.shape)
            shape[axis] = extra
            fill = torch.zeros(shape, dtype=y.dtype)
            if bias is not None:
                fill += bias.reshape(1, -1, *(1,) * dims)
            y = torch.cat([y, fill], dim=axis)
        y = y.narrow(axis, begin, y.shape[axis] - begin - end)
    return y


@pytest.mark.parametrize("case", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_conv_case_matches_expected_output(case: Path):
    if case.name in _NOT_APPLICABLE:
        pytest.skip(_NOT_APPLICABLE[case.name])
    graph = hpa.load(str(case / "model.onnx"))
    assert len(graph.layers) == 1, [layer.name for layer in graph]
    layer = graph.layers[0]
    assert layer.kind.startswith(("conv", "conv_transpose"))
    sets = sorted(case.glob("test_data_set_*"))
    assert sets, f"{case} has no test data"
    for data in sets:
        x = torch.from_numpy(_tensor(data / "input_0.pb"))
        expected = _tensor(data / "output_0.pb")
        got = run_layer(layer, x).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        if layer.output_shape is not None:
            assert tuple(layer.output_shape) == tuple(expected.shape[1:])
