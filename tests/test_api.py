"""The library API a notebook user sees: load, scan, and the ScanResult outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

import hpa


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def train_a_little(net: nn.Module, steps: int = 30) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 1, 9, 9, generator=g)
        loss = nn.functional.cross_entropy(net(x), (x.mean((1, 2, 3)) > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_public_api_is_explicit():
    for name in hpa.__all__:
        assert getattr(hpa, name) is not None
    assert callable(hpa.hookimpl)


def test_scan_module_against_a_saved_initial_snapshot(tmp_path):
    net = model()
    torch.save(net.state_dict(), tmp_path / "epoch0.pt")
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    train_a_little(net)
    result = hpa.scan(net, input_size=(1, 9, 9), init=tmp_path / "epoch0.pt")
    values = result.statistics["projection"].layers["2"]
    w, init = net[2].weight.detach().double().numpy(), w0["2.weight"].double().numpy()
    assert values["distance_from_init"]["relative_l2"] == pytest.approx(
        np.linalg.norm(w - init) / np.linalg.norm(init), rel=1e-9)
    flat0 = init.reshape(6, -1)
    np.testing.assert_allclose(values["init"]["cosines"],
                               flat0.sum(1) / (np.linalg.norm(flat0, axis=1) * np.sqrt(flat0.shape[1])), atol=1e-12)


def test_compare_init_for_a_module_uses_a_fresh_seeded_init():
    net = model()
    train_a_little(net)
    a = hpa.scan(net, input_size=(1, 9, 9), compare_init=True, seed=3)
    b = hpa.scan(net, input_size=(1, 9, 9), compare_init=True, seed=3)
    c = hpa.scan(net, input_size=(1, 9, 9), compare_init=True, seed=4)
    cos = lambda r: r.statistics["projection"].layers["0"]["init"]["cosines"]  # noqa: E731
    assert cos(a) == cos(b) and cos(a) != cos(c)
    assert (a.init.source["weights"], a.init.source["seed"]) == ("none", 3)
    assert a.statistics["projection"].layers["0"]["cosines"] != cos(a)


def test_outputs_agree_with_each_other(tmp_path):
    result = hpa.scan(model(), input_size=(1, 9, 9), with_linear=True)
    data = result.to_dict()
    frame = result.to_pandas()
    assert list(frame["name"]) == [l["name"] for l in data["layers"]]
    assert list(frame["projection.n_l"]) == [l["statistics"]["projection"]["n_l"] for l in data["layers"]]
    result.to_csv(tmp_path / "layers.csv")
    rows = list(csv.DictReader((tmp_path / "layers.csv").open()))
    assert [float(r["projection.mean"]) for r in rows] == pytest.approx(list(frame["projection.mean"]), abs=0)
    files = result.plot(tmp_path / "figs")
    assert sorted(f.name for f in files) == ["projection_histograms.png", "projection_n_l.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def test_load_accepts_a_graph_and_rejects_other_objects():
    graph = hpa.load(model(), input_size=(1, 9, 9))
    assert hpa.load(graph) is graph
    assert set(hpa.scan(graph, statistics=["projection"]).statistics) == {"projection"}
    with pytest.raises(hpa.SpecError):
        hpa.load(42)
    with pytest.raises(hpa.OptionError, match="input_size"):
        hpa.load(model())
    with pytest.raises(hpa.OptionError, match="either"):
        hpa.scan(model(), input_size=(1, 9, 9), compare_init=True, init="x.pt")


def test_listing_functions():
    assert {"torchvision", "timm", "torch", "zoo", "onnx", "matconvnet"} <= {l.prefix for l in hpa.list_loaders()}
    assert "projection" in {s.name for s in hpa.list_statistics()}
    assert isinstance(hpa.list_experiments(), list)


def test_init_snapshot_of_a_module_honours_trust_pickle(tmp_path):
    net = model()
    torch.save(model(), tmp_path / "whole_module.pt")  # a pickled nn.Module, not a state_dict
    with pytest.raises(hpa.UnsafeFileError, match="--trust-pickle"):
        hpa.scan(net, input_size=(1, 9, 9), init=tmp_path / "whole_module.pt")
    result = hpa.scan(net, input_size=(1, 9, 9), init=tmp_path / "whole_module.pt", trust_pickle=True,
                      statistics=["projection"])
    assert result.statistics["projection"].layers["0"]["distance_from_init"]["relative_l2"] == 0.0
