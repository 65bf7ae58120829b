"""onnxruntime runs exported models and agrees with torch; CUDA when present, quietly CPU otherwise."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from hpa.backends.onnx.runtime import providers, run_onnx, session
from hpa.errors import LoadError


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, groups=2, dilation=2), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return model, path


def test_runtime_matches_torch(exported):
    model, path = exported
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for inputs in (x, [x], {"x": x}):
        [got] = run_onnx(path, inputs)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_provider_choice_follows_the_hardware(exported):
    _, path = exported
    chosen = session(path).get_providers()
    # decided without hpa: onnxruntime offers CUDA and torch's own CUDA runtime sees a device
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()
    if gpu:
        assert chosen[0] == "CUDAExecutionProvider"
    else:
        assert chosen == ["CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]


def test_cpu_fallback_is_silent(exported):
    _, path = exported
    code = ("import numpy as np; from hpa.backends.onnx.runtime import run_onnx; "
            f"run_onnx({str(path)!r}, np.zeros((1, 3, 16, 16), np.float32))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_wrong_number_of_inputs_and_bad_file(exported, tmp_path):
    _, path = exported
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(LoadError, match="takes 1 inputs"):
        run_onnx(path, [x, x])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LoadError, match="onnxruntime cannot run"):
        run_onnx(bad, x)
