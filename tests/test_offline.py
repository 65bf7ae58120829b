"""Without network, pretrained weights come from the cache or fail fast with one line saying where the
cache is and how to fill it.  No test reaches the network: the subprocess's proxy is a closed local
port, so every request is refused at once, as on a machine without a connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from conftest import assert_bad_input

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there
SLACK = 5.0  # the bar: the failure costs less than this beyond loading hpa, torch and the loader


def _offline(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY=CLOSED,
               HTTP_PROXY=CLOSED, https_proxy=CLOSED, http_proxy=CLOSED)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hpa", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    return proc, time.monotonic() - start


def _baseline(tmp_path: Path, spec: str) -> float:
    """Seconds for the same loader to refuse an unknown model name: the imports, without any download."""
    proc, seconds = _offline(tmp_path, "scan", spec)
    assert_bad_input(proc, "unknown")
    return seconds


def test_timm_without_network_and_cache_fails_fast_naming_the_cache(tmp_path):
    base = _baseline(tmp_path, "timm:no_such_model_xyz")
    proc, seconds = _offline(tmp_path, "scan", "timm:resnet18")
    line = assert_bad_input(proc, "no cached pretrained weights", "hf download timm/resnet18",
                            "cannot be downloaded", "no connection", "--weights none")
    assert str(tmp_path / "hf" / "hub") in line
    assert seconds - base < SLACK, (seconds, base)  # huggingface_hub alone retried for ~52 s


def test_torchvision_without_network_and_cache_fails_fast_naming_the_folder(tmp_path):
    base = _baseline(tmp_path, "torchvision:no_such_model_xyz")
    proc, seconds = _offline(tmp_path, "scan", "torchvision:resnet18")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    line = assert_bad_input(proc, "no cached", "resnet18-f37072fd.pth", "download.pytorch.org",
                            "no connection", "--weights none")
    assert str(folder) in line
    assert seconds - base < SLACK, (seconds, base)
    assert not (tmp_path / "torch").exists()  # a failed attempt leaves nothing behind


def _fill_hf_cache(hf_home: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """The Hugging Face cache layout of one downloaded file: refs/main -> snapshots/<commit>/file."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_timm_weights_in_the_cache_load_without_network(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    _fill_hf_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k", model.state_dict())
    base = _baseline(tmp_path, "timm:no_such_model_xyz")
    proc, seconds = _offline(tmp_path, "scan", "timm:test_resnet.r160_in1k", "--stat", "projection",
                             "--no-fold-bn", "--input-size", "3,32,32", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["weights"] == "pretrained"
    first = data["layers"][0]
    w = dict(model.named_parameters())[first["name"] + ".weight"].detach().double().numpy().reshape(
        first["out_channels"], -1)
    expected = w.sum(1) / (np.linalg.norm(w, axis=1) * np.sqrt(w.shape[1]))
    np.testing.assert_allclose(first["statistics"]["projection"]["cosines"], expected, atol=1e-12)
    assert seconds - base < SLACK + 20, (seconds, base)  # tracing the model, but no minute of retries
