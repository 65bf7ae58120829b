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


# -- analyse: analysis apart from loading -------------------------------------------------------------

def _relative_l2(w, w0) -> float:
    return float(np.linalg.norm(w - w0) / np.linalg.norm(w0))


def test_analyse_and_scan_take_a_graph_as_init():
    net = model()
    w0 = net[2].weight.detach().double().numpy().copy()
    init_graph = hpa.load(net, input_size=(1, 9, 9))
    train_a_little(net)
    graph = hpa.load(net, input_size=(1, 9, 9))
    expected = _relative_l2(net[2].weight.detach().double().numpy(), w0)
    analysed = hpa.analyse(graph, init=init_graph, statistics=["projection"])
    assert analysed.statistics["projection"].layers["2"]["distance_from_init"]["relative_l2"] == pytest.approx(
        expected, rel=1e-9)
    assert analysed.init is init_graph and init_graph.source["role"] == "init"
    scanned = hpa.scan(graph, init=init_graph, statistics=["projection"])  # load + init + analyse
    assert scanned.to_dict()["layers"] == analysed.to_dict()["layers"]


def test_analyse_and_scan_take_a_module_as_init():
    net, start = model(), model()  # model() seeds, so start holds the same initial weights as net
    train_a_little(net)
    graph = hpa.load(net, input_size=(1, 9, 9))
    expected = _relative_l2(net[0].weight.detach().double().numpy(), start[0].weight.detach().double().numpy())
    for result in (hpa.analyse(graph, init=start, statistics=["projection"]),
                   hpa.scan(net, input_size=(1, 9, 9), init=start, statistics=["projection"])):
        assert result.statistics["projection"].layers["0"]["distance_from_init"]["relative_l2"] == pytest.approx(
            expected, rel=1e-9)


def test_analyse_refuses_what_it_cannot_use():
    graph = hpa.load(model(), input_size=(1, 9, 9))
    other = hpa.load(nn.Sequential(nn.Conv2d(1, 4, 3)), input_size=(1, 9, 9))
    with pytest.raises(hpa.OptionError, match="same architecture"):
        hpa.analyse(graph, init=other)
    with pytest.raises(hpa.OptionError, match="ConvGraph"):
        hpa.analyse(model())
    with pytest.raises(hpa.OptionError, match="init must be a ConvGraph"):
        hpa.analyse(graph, init="epoch0.pt")
    with pytest.raises(hpa.OptionError, match="bins"):
        hpa.analyse(graph, bins=0)


# -- keyword arguments: typos are TypeErrors naming the close match ----------------------------------

@pytest.mark.parametrize("call, typo, meant", [
    (lambda **kw: hpa.scan(model(), input_size=(1, 9, 9), **kw), "skip1x1", "skip_1x1"),
    (lambda **kw: hpa.scan("zoo:digits_cnn", **kw), "with_linaer", "with_linear"),
    (lambda **kw: hpa.scan("zoo:digits_cnn", **kw), "cones_rotaton", "cones_rotation"),
    (lambda **kw: hpa.load("zoo:digits_cnn", **kw), "fold_nb", "fold_bn"),
    (lambda **kw: hpa.load("torchvision:resnet18", **kw), "num_clases", "num_classes"),
    (lambda **kw: hpa.analyse(hpa.load(model(), input_size=(1, 9, 9)), **kw), "bin", "bins"),
])
def test_unknown_keywords_are_type_errors_with_a_suggestion(call, typo, meant):
    with pytest.raises(TypeError) as info:
        call(**{typo: True})
    assert isinstance(info.value, hpa.UnknownOptionError)
    assert f"'{typo}'" in str(info.value) and f"did you mean '{meant}'" in str(info.value)


def test_a_loader_option_is_refused_for_a_module_or_a_graph():
    with pytest.raises(TypeError, match="num_classes"):
        hpa.load(model(), input_size=(1, 9, 9), num_classes=3)
    with pytest.raises(TypeError, match="num_classes"):
        hpa.load(hpa.load(model(), input_size=(1, 9, 9)), num_classes=3)


# -- weights: "DEFAULT" is the loader's weights, None is no pretrained weights -------------------------

def test_weights_none_means_a_seeded_random_init_and_default_the_shipped_weights():
    from hpa_zoo.models import MODELS, init

    config = MODELS["digits_cnn"]
    fresh = hpa.load("zoo:digits_cnn", weights=None, fold_bn=False)
    first_conv = next(m for m in init("digits_cnn", config.seed).modules() if isinstance(m, nn.Conv2d))
    np.testing.assert_array_equal(next(iter(fresh)).weight, first_conv.weight.detach().double().numpy())
    assert fresh.source["weights"] == "init"
    same = hpa.load("zoo:digits_cnn", weights="none", fold_bn=False)  # the CLI's spelling still works
    assert all(np.array_equal(a.weight, b.weight) for a, b in zip(fresh, same))
    trained = hpa.load("zoo:digits_cnn", fold_bn=False)
    assert trained.source["weights"] == "trained"
    assert hpa.load("zoo:digits_cnn", weights="DEFAULT", fold_bn=False).source["weights"] == "trained"
    assert not np.array_equal(next(iter(trained)).weight, next(iter(fresh)).weight)
    with pytest.raises(hpa.OptionError, match="weights must be"):
        hpa.load("zoo:digits_cnn", weights=3)


def test_plugin_author_helpers_are_exported(tmp_path):
    import hpa.plugins

    assert hpa.parse_input_size("3x32x32") == (3, 32, 32) == hpa.parse_input_size([3, 32, 32])
    with pytest.raises(hpa.OptionError, match="--input-size"):
        hpa.parse_input_size("3,a")
    with pytest.raises(hpa.HpaError, match="missing.onnx"):
        hpa.check_model_file(tmp_path / "missing.onnx")
    (tmp_path / "net.onnx").write_bytes(b"\x08\x07")
    assert hpa.check_model_file(tmp_path / "net.onnx").name == "net.onnx"
    assert hpa.module_converters is hpa.plugins.module_converters
    from hpa.nn import ChannelReLUConv2d
    assert ChannelReLUConv2d in hpa.module_converters()
    assert {"analyse", "Option", "ModuleConverter", "UnknownOptionError", "check_model_file", "parse_input_size",
            "module_converters"} <= set(hpa.__all__)
