"""``hpa scan``, ``hpa list-models`` and bad input, through the real command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import assert_bad_input


@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8, 2))
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    return path, net


def test_scan_prints_a_table_with_skipped_layers(net_file, run_hpa):
    path, _ = net_file
    proc = run_hpa("scan", path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(l for l in lines if l.startswith("#"))
    for column in ("layer", "kind", "shape", "F", "n_l", "mean cos"):
        assert column in header
    assert any(l.split()[1:3] == ["0", "conv2d"] for l in lines if l[:1].isdigit())
    skipped = [l for l in lines if "[projection]" in l and "linear layer; pass --with-linear" in l]
    assert len(skipped) == 1 and skipped[0].split()[0] == "1" and skipped[0].endswith(": 6"), skipped


def test_json_follows_the_documented_schema(net_file, run_hpa):
    path, net = net_file
    proc = run_hpa("scan", path, "--json", "--with-linear")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["spec"] == str(path) and data["model"]["loader"] == "torch"
    keys = {"index", "name", "kind", "out_channels", "in_channels", "kernel_size", "stride", "padding",
            "dilation", "groups", "activation", "bn_folded", "statistics"}
    for layer in data["layers"]:
        assert keys <= set(layer)
        assert {"n_l", "mean", "std", "n_filters", "n_dead", "cosines"} <= set(layer["statistics"]["projection"])
    last = data["layers"][-1]
    assert last["kind"] == "linear" and last["statistics"]["projection"]["n_filters"] == 2
    w = net[6].weight.detach().double().numpy()
    expected = w.sum(1) / (np.linalg.norm(w, axis=1) * np.sqrt(w.shape[1]))
    np.testing.assert_allclose(last["statistics"]["projection"]["cosines"], expected, atol=1e-12)
    assert data["skipped"] == []


def test_out_writes_json_csv_and_figures(net_file, run_hpa, tmp_path):
    path, _ = net_file
    out = tmp_path / "result"
    proc = run_hpa("scan", path, "--out", out, "--format", "svg")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [".hpa-manifest.json", "filters.csv", "layers.csv", "projection_histograms.svg",
                     "projection_n_l.svg", "result.json"]
    data = json.loads((out / "result.json").read_text())
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert [r["name"] for r in rows] == [l["name"] for l in data["layers"]]
    for row, layer in zip(rows, data["layers"]):
        if "projection" in layer["statistics"]:
            assert float(row["projection.n_l"]) == layer["statistics"]["projection"]["n_l"]
    filters = list(csv.DictReader((out / "filters.csv").open()))
    assert len(filters) == 8 + 8
    again = run_hpa("scan", path, "--out", out, "--format", "png")  # an earlier result may be replaced
    assert again.returncode == 0 and (out / "projection_n_l.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "projection_n_l.svg").exists()


def test_out_refuses_a_folder_that_is_not_an_hpa_result(net_file, run_hpa, tmp_path):
    path, _ = net_file
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert_bad_input(run_hpa("scan", path, "--out", out), "non-empty")
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_nan_weights_are_reported_per_layer_and_exit_2(tmp_path, run_hpa):
    state = {"a.weight": torch.randn(4, 3, 3, 3), "b.weight": torch.randn(4, 4, 3, 3)}
    state["b.weight"][1, 0, 0, 0] = float("nan")
    state["b.weight"][2, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "out"
    proc = run_hpa("scan", tmp_path / "nan.pt", "--out", out)
    line = assert_bad_input(proc, "layer b", "2 of 4 filters", "NaN")
    assert line.startswith("Error:")
    data = json.loads((out / "result.json").read_text())
    projection = data["layers"][1]["statistics"]["projection"]
    assert projection["n_nonfinite"] == 2 and projection["cosines"][1] is None
    assert data["layers"][0]["statistics"]["projection"]["n_nonfinite"] == 0


@pytest.mark.parametrize("spec, words", [
    ("torchvison:vgg19", ["unknown loader prefix", "torchvision"]),
    ("torchvision:resnet19", ["unknown torchvision model", "resnet18"]),
    ("timm:resnet5O", ["unknown timm model", "resnet50"]),
    ("vgg19", ["neither a file", "torchvision:vgg19"]),
    ("timm:vit_tiny", ["unknown timm model", "did you mean 'timm:vit_tiny_patch16_224'"]),
])
def test_unknown_names_suggest_close_ones(spec, words, run_hpa):
    assert_bad_input(run_hpa("scan", spec), *words)


def test_a_missing_file_is_said_to_be_missing_with_the_formats_hpa_reads(run_hpa):
    for spec in ("model.h5", "weights/model.onnx2"):
        line = assert_bad_input(run_hpa("scan", spec), f"{spec} does not exist", ".pth", ".onnx", ".safetensors")
        assert "torchvision:model" not in line and "did you mean" not in line


def test_list_models_suggests_only_names_that_are_close(run_hpa):
    nothing = assert_bad_input(run_hpa("list-models", "timm", "nonexistent*"), "no timm model matches")
    assert "did you mean" not in nothing and "**" not in nothing and "hpa list-models timm" in nothing
    typo = assert_bad_input(run_hpa("list-models", "timm", "resnet5O*"), "did you mean")
    assert "'resnet50'" in typo


def test_unknown_statistic_and_bad_options(net_file, run_hpa):
    path, _ = net_file
    assert_bad_input(run_hpa("scan", path, "--stat", "projektion"), "unknown statistic", "projection")
    assert_bad_input(run_hpa("scan", path, "--input-size", "3,x,2"), "--input-size")
    assert_bad_input(run_hpa("scan", path, "-o", "novalue"), "KEY=VALUE")


@pytest.mark.parametrize("args,words", [
    (("scan",), ("Missing argument", "hpa scan --help")),
    (("scan", "x.pth", "--bogus", "1"), ("--bogus", "hpa scan --help")),
    (("nosuch",), ("nosuch", "hpa --help")),
    (("train", "--plugin", "digits", "--epochs", "abc"), ("--epochs", "abc", "hpa train --help")),
    (("train", "--plugin", "digits", "--precision", "fp8"), ("--precision", "fp8")),
])
def test_usage_errors_are_one_line_naming_the_help(run_hpa, tmp_path, args, words):
    assert_bad_input(run_hpa(*args), *words)
    assert list(tmp_path.iterdir()) == []  # run_hpa's working folder: nothing written


def test_debug_shows_the_traceback(run_hpa):
    proc = run_hpa("scan", "nope.pth", env={"HPA_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_list_models(run_hpa):
    proc = run_hpa("list-models", "torchvision", "vgg1[13]*")
    assert proc.returncode == 0
    assert proc.stdout.split() == ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn"]
    assert "vgg19" in run_hpa("list-models", "timm", "vgg*").stdout.split()
    assert_bad_input(run_hpa("list-models", "torch"), "reads files")
    assert_bad_input(run_hpa("list-models", "torchvision", "zzz*"), "no torchvision model")
