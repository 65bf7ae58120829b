"""Torch files: state_dicts, checkpoints, safetensors, pickled modules, and bad input."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import hpa
from conftest import assert_bad_input


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(-2, 2)
    return net.eval()


def assert_same_weights(file_graph, module_graph):
    assert [l.name for l in file_graph] == [l.name for l in module_graph]
    for a, b in zip(file_graph, module_graph):
        assert a.kind == b.kind and a.bn_folded == b.bn_folded
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12, atol=0)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict", "net", "dataparallel"])
def test_state_dict_file_gives_the_modules_weights(tmp_path, wrap):
    net = small_net()
    state = net.state_dict()
    if wrap == "dataparallel":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrap:
        payload = {wrap: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    else:
        payload = state
    path = tmp_path / "net.pth"
    torch.save(payload, path)
    from_file = hpa.load(str(path))
    from_module = hpa.load(net, input_size=(3, 8, 8))
    assert_same_weights(from_file, from_module)
    assert from_file["0"].stride is None and from_file["0"].activation is None  # unknown, not guessed


def test_safetensors_file_is_read_memory_mapped(tmp_path):
    net = small_net()
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    graph = hpa.load(str(path), fold_bn=False)
    assert isinstance(graph["4"].weight, np.memmap) or isinstance(graph["4"].weight.base, np.memmap)
    np.testing.assert_array_equal(graph["4"].weight, net[4].weight.detach().numpy())
    assert_same_weights(hpa.load(str(path)), hpa.load(net, input_size=(3, 8, 8)))


def test_state_dict_batchnorm_that_follows_nothing_is_listed(tmp_path):
    state = {"bn0.weight": torch.ones(3), "bn0.bias": torch.zeros(3), "bn0.running_mean": torch.zeros(3),
             "bn0.running_var": torch.ones(3), "conv.weight": torch.randn(4, 3, 3, 3),
             "norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)}
    torch.save(state, tmp_path / "odd.pt")
    graph = hpa.load(str(tmp_path / "odd.pt"))
    assert [l.name for l in graph] == ["conv"]
    reasons = {s.name: s.reason for s in graph.skipped}
    assert "not folded" in reasons["bn0"] and "normalisation" in reasons["norm"]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['HPA_TEST_SENTINEL']}",))


def test_malicious_pickle_is_never_executed(tmp_path, run_hpa):
    sentinel = tmp_path / "pwned"
    os.environ["HPA_TEST_SENTINEL"] = str(sentinel)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv.weight": torch.randn(2, 1, 3, 3)}, "payload": Evil()}, path)
    proc = run_hpa("scan", path, "--out", tmp_path / "out")
    assert_bad_input(proc, "--trust-pickle")
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(hpa.UnsafeFileError):
        hpa.load(str(path))
    assert not sentinel.exists()


def test_pickled_module_loads_only_when_trusted(tmp_path):
    net = small_net()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(hpa.UnsafeFileError, match="--trust-pickle"):
        hpa.load(str(path), input_size=(3, 8, 8))
    with pytest.raises(hpa.OptionError, match="--input-size"):
        hpa.load(str(path), trust_pickle=True)
    graph = hpa.load(str(path), trust_pickle=True, input_size=(3, 8, 8))
    assert_same_weights(graph, hpa.load(net, input_size=(3, 8, 8)))
    assert graph["4"].predecessors == ("0",)


def write_bad_files(tmp_path):
    torch.save(small_net().state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("name, words", [
    ("missing.pth", ["does not exist"]),
    ("folder.pth", ["directory"]),
    ("empty.pt", ["empty"]),
    ("random.pth", ["not a readable PyTorch checkpoint"]),
    ("truncated.pth", ["truncated"]),
    ("bad.safetensors", ["safetensors"]),
])
def test_bad_files_get_one_line_and_status_2(tmp_path, run_hpa, name, words):
    write_bad_files(tmp_path)
    proc = run_hpa("scan", tmp_path / name, "--out", tmp_path / "out")
    assert_bad_input(proc, *words)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_truncated_zip_is_really_truncated(tmp_path):
    write_bad_files(tmp_path)
    assert zipfile.is_zipfile(tmp_path / "good.pth") and not zipfile.is_zipfile(tmp_path / "truncated.pth")


def test_state_dict_with_no_conv_layers(tmp_path, run_hpa):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "mlp.pt")
    assert_bad_input(run_hpa("scan", tmp_path / "mlp.pt"), "no conv layers")


def test_pickle_module_is_not_needed_for_plain_checkpoints(tmp_path):
    path = tmp_path / "plain.pkl.pth"
    with open(path, "wb") as handle:  # a legacy (non-zip) torch file with only tensors
        torch.save(small_net().state_dict(), handle, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)  # really the legacy format, not the zip one
    assert_same_weights(hpa.load(str(path)), hpa.load(small_net(), input_size=(3, 8, 8)))
