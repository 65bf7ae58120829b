"""torchvision and timm loaders, offline by construction: weights from files, caches, or a seeded init.

Every test runs with empty torch and Hugging Face caches, the hub in offline
mode, and every proxy variable pointing at a closed local port, so that even on
a machine with network access no test downloads anything (a download attempt
fails at once and the loader's offline message is what the tests check).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import hpa
from conftest import assert_bad_input

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
OFFLINE = {"HF_HUB_OFFLINE": "1", "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
           "https_proxy": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY, "all_proxy": DEAD_PROXY, "NO_PROXY": "",
           "no_proxy": ""}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Empty caches and no way out, for this process and the ``hpa`` subprocesses it starts."""
    env = {**OFFLINE, "TORCH_HOME": str(tmp_path / "th"), "HF_HOME": str(tmp_path / "hf")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_default_weights_fail_clearly_without_cache_or_network(tmp_path, run_hpa):
    proc = run_hpa("scan", "torchvision:resnet18")
    line = assert_bad_input(proc, "cannot download", "resnet18-", "--weights")
    assert str(tmp_path / "th") in line


def test_default_weights_come_from_the_hub_cache(tmp_path):
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    folder = tmp_path / "th" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), folder / url.rsplit("/", 1)[1])
    graph = hpa.load("torchvision:resnet18", fold_bn=False)
    assert graph.source["weights"].endswith("IMAGENET1K_V1")
    np.testing.assert_array_equal(graph["layer3.1.conv2"].weight, reference.layer3[1].conv2.weight.detach().numpy())


def test_weights_none_is_seeded_and_enum_names_are_checked():
    a = hpa.load("torchvision:squeezenet1_1", weights="none", seed=1)
    b = hpa.load("torchvision:squeezenet1_1", weights="none", seed=1)
    c = hpa.load("torchvision:squeezenet1_1", weights="none", seed=2)
    np.testing.assert_array_equal(a["features.0"].weight, b["features.0"].weight)
    assert not np.array_equal(a["features.0"].weight, c["features.0"].weight)
    with pytest.raises(hpa.SpecError, match="IMAGENET1K_V1"):
        hpa.load("torchvision:squeezenet1_1", weights="IMAGENET1K_V3")


def test_timm_pretrained_fails_clearly_offline(tmp_path, run_hpa):
    proc = run_hpa("scan", "timm:resnet18")
    assert_bad_input(proc, "timm:resnet18", "HF_HUB_OFFLINE", "--weights")


@pytest.mark.slow
def test_torchvision_and_timm_vgg19_give_identical_cosines_from_one_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vgg19.pth"
    torch.save(torchvision.models.vgg19().state_dict(), path)
    tv = hpa.scan("torchvision:vgg19", weights=str(path), statistics=["projection"]).statistics["projection"].layers
    tm = hpa.scan("timm:vgg19", weights=str(path), statistics=["projection"]).statistics["projection"].layers
    convs = [name for name in tv if name.startswith("features.")]
    assert len(convs) == 16
    for name in convs:
        assert tv[name]["cosines"] == tm[name]["cosines"], name
    assert len(set(tv) & set(tm)) >= 16
