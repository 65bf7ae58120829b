"""The matconvnet loader: torch -> MatConvNet .mat (zoo layout) -> graph, against the torch tracer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hpa
from hpa.errors import LoadError, OptionError, UnsupportedModelError
from hpa_plugins.projection import cosines, filter_matrix

sys.path.insert(0, str(Path(__file__).parent))
import mcn_export as mcn  # noqa: E402
from conftest import assert_bad_input  # noqa: E402

SIZE = (3, 32, 32)


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch):
    monkeypatch.setenv("HPA_DISABLE_PLUGIN_AUTOLOAD", "1")


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm with non-trivial statistics and some negative gammas."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = torch.randn(c, generator=g)
            module.weight.data[0] = -abs(module.weight.data[0]) - 0.5  # at least one negative gamma
            module.bias.data = torch.randn(c, generator=g)
            module.running_mean.copy_(torch.randn(c, generator=g))
            module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def plain_net() -> nn.Sequential:
    """Plain, BN (negative gammas), grouped, depthwise, dilated, leaky, avg-pool, dropout, 1x1 with Cout=1."""
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2), nn.LeakyReLU(0.1),
        nn.Conv2d(16, 16, 3, stride=2, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AvgPool2d(2), nn.Dropout(0.5),
        nn.Conv2d(16, 1, 1),
    ))


def padded_net() -> nn.Sequential:
    """Asymmetric padding: a ZeroPad2d before a conv (MatConvNet writes it as the conv's pad)."""
    torch.manual_seed(1)
    return _randomise_bn(nn.Sequential(
        nn.ZeroPad2d((0, 1, 2, 1)), nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(6, 6, 2, groups=3), nn.ReLU(),
    ))


def residual_net() -> mcn.ResidualConcatNet:
    torch.manual_seed(2)
    return _randomise_bn(mcn.ResidualConcatNet())


# -- comparing graphs ---------------------------------------------------------------------------

ATTRIBUTES = ("kind", "out_channels", "in_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "activation", "bn_folded", "input_shape", "output_shape")


def assert_same_graph(got: hpa.ConvGraph, want: hpa.ConvGraph) -> None:
    assert len(got) == len(want), (got.summary(), want.summary())
    index_got = {layer.name: layer.index for layer in got} | {"input": -1}
    index_want = {layer.name: layer.index for layer in want} | {"input": -1}
    for a, b in zip(got, want):
        da, db = a.attributes(), b.attributes()
        for key in ATTRIBUTES:
            assert da[key] == db[key], f"{a.name} vs {b.name}: {key} {da[key]} != {db[key]}"
        assert a.activation_params.keys() == b.activation_params.keys()
        for key, value in b.activation_params.items():
            assert a.activation_params[key] == pytest.approx(value)
        assert {index_got[p] for p in a.predecessors} == {index_want[p] for p in b.predecessors}
        via_a = {index_got[p]: set(ops) for p, ops in a.via.items()}
        via_b = {index_want[p]: set(ops) for p, ops in b.via.items()}
        assert via_a == via_b, (a.name, a.via, b.via)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert (a.bias is None) == (b.bias is None)
        if a.bias is not None:
            np.testing.assert_allclose(a.bias, b.bias, rtol=1e-5, atol=1e-5)
        ca, cb = cosines(filter_matrix(a))["cosines"], cosines(filter_matrix(b))["cosines"]
        np.testing.assert_allclose(ca, cb, rtol=0, atol=1e-6)


def assert_convs_compute(graph: hpa.ConvGraph, exported: mcn.Exported) -> None:
    """Each conv rebuilt from the graph alone (F.pad with its pairs, then conv2d) matches torch."""
    g = torch.Generator().manual_seed(3)
    assert set(exported) == {layer.name for layer in graph}
    for layer in graph:
        pad, conv, bn = exported[layer.name]
        x = torch.randn((2, *layer.input_shape), generator=g)
        with torch.no_grad():
            want = conv(F.pad(x, pad) if pad else x)
            want = bn(want) if bn is not None else want
            (top, bottom), (left, right) = layer.padding
            weight = torch.from_numpy(np.asarray(layer.weight, np.float64))
            bias = None if layer.bias is None else torch.from_numpy(np.asarray(layer.bias, np.float64))
            got = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight, bias, stride=layer.stride,
                           dilation=layer.dilation, groups=layer.groups)
        assert tuple(got.shape[1:]) == layer.output_shape
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["new", "beta16"])
@pytest.mark.parametrize("wrap_net", [False, True])
@pytest.mark.parametrize("export", [mcn.export_simplenn, mcn.export_dagnn], ids=["simplenn", "dagnn"])
def test_sequential_round_trip(tmp_path, export, variant, wrap_net):
    model = plain_net()
    path = tmp_path / "net.mat"
    exported = export(model, path, input_size=SIZE, variant=variant, wrap_net=wrap_net)
    graph = hpa.load(path)
    assert graph.source["loader"] == "matconvnet"
    assert graph.source["format"] == ("simplenn" if export is mcn.export_simplenn else "dagnn")
    assert graph.source["variant"] == variant and graph.source["net_wrapper"] == wrap_net
    assert graph.input_shape == SIZE and graph.skipped == []
    assert_same_graph(graph, hpa.load(model, input_size=SIZE))
    assert_convs_compute(graph, exported)
    assert [layer.name for layer in graph][:1] == (["conv1"] if export is mcn.export_simplenn else ["layer1"])


@pytest.mark.parametrize("variant", ["new", "beta16"])
def test_residual_concat_dagnn(tmp_path, variant):
    model = residual_net()
    path = tmp_path / "res.mat"
    exported = mcn.export_dagnn(model.dag(), path, input_size=SIZE, variant=variant)
    graph = hpa.load(f"matconvnet:{path}")
    assert_same_graph(graph, hpa.load(model, input_size=SIZE))
    assert_convs_compute(graph, exported)
    assert graph["head"].predecessors == ("b", "c", "stem")  # stem reaches it through the skip connection
    assert set(graph["head"].via["b"]) == {"add", "relu", "cat"}
    assert set(graph["head"].via["stem"]) == {"relu", "max_pool2d", "add", "cat"}
    assert graph["b"].activation == "none"  # its output goes to a Sum, not straight into a ReLU
    assert graph["c"].activation == "leaky_relu" and graph["c"].activation_params == {"negative_slope": 0.2}


def test_asymmetric_padding_merged(tmp_path):
    """MatConvNet stores ZeroPad2d + conv as one conv with pad [top bottom left right].

    The torch tracer must merge a zero F.pad into the following conv's padding pairs
    for the two graphs to agree (the numeric check below holds regardless)."""
    model = padded_net()
    for export in (mcn.export_simplenn, mcn.export_dagnn):
        path = tmp_path / f"{export.__name__}.mat"
        exported = export(model, path, input_size=SIZE)
        graph = hpa.load(path)
        assert [layer.padding for layer in graph] == [((2, 1), (0, 1)), ((0, 1), (1, 0))]
        assert_convs_compute(graph, exported)
    assert_same_graph(graph, hpa.load(model, input_size=SIZE))


def test_no_fold_bn_keeps_raw_weights(tmp_path):
    model = plain_net()
    path = tmp_path / "net.mat"
    mcn.export_simplenn(model, path, input_size=SIZE)
    graph = hpa.load(path, fold_bn=False)
    assert not any(layer.bn_folded for layer in graph)
    assert_same_graph(graph, hpa.load(model, input_size=SIZE, fold_bn=False))


def test_bnorm_fold_uses_stored_sigma(tmp_path):
    """y = gamma (x - mean) / sigma + beta with the stored sigma, whatever epsilon says."""
    conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    _randomise_bn(nn.Sequential(conv, bn))
    path = tmp_path / "bn.mat"
    layer = {"name": "bn", "type": "bnorm", "epsilon": 1.0,  # a misleading epsilon: must be ignored
             "weights": mcn.cell([mcn.column(bn.weight, 3, 1), mcn.column(bn.bias, 3, 0), mcn.moments_of(bn)])}
    mcn.export_simplenn([conv, layer], path, input_size=(2, 8, 8))
    folded = hpa.load(path)["conv1"]
    sigma = np.sqrt(bn.running_var.numpy().astype(np.float64) + bn.eps).astype(np.float32).astype(np.float64)
    scale = bn.weight.detach().numpy() / sigma
    want = conv.weight.detach().numpy().astype(np.float64) * scale[:, None, None, None]
    np.testing.assert_allclose(folded.weight, want, rtol=1e-12)
    assert folded.bn_folded and (scale < 0).any()


def test_trailing_singletons_and_missing_fields(tmp_path):
    """2-D and 3-D weight arrays (MATLAB drops trailing 1s) and layers without pad/stride/dilate/leak."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Conv2d(5, 1, 1))
    path = tmp_path / "thin.mat"
    exported = mcn.export_simplenn(model, path, input_size=(1, 9, 9), omit_defaults=True)
    raw = __import__("scipy.io").io.loadmat(path, struct_as_record=False)["layers"]
    shapes = [raw[0, i][0, 0].weights[0, 0].shape for i in (0, 2, 4)]
    assert shapes == [(3, 3), (3, 3, 1, 5), (1, 1, 5)]
    assert not hasattr(raw[0, 0][0, 0], "pad") and not hasattr(raw[0, 1][0, 0], "leak")
    graph = hpa.load(path)
    assert_same_graph(graph, hpa.load(model, input_size=(1, 9, 9)))
    assert_convs_compute(graph, exported)


def test_scalar_pad_and_stride(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2, stride=2), nn.ReLU())
    path = tmp_path / "old.mat"
    mcn.export_simplenn(model, path, input_size=SIZE, variant="beta16")
    layer = __import__("scipy.io").io.loadmat(path, struct_as_record=False)["layers"][0, 0][0, 0]
    assert layer.pad.shape == (1, 1) and layer.stride.shape == (1, 1)
    assert hpa.load(path)["conv1"].padding == ((2, 2), (2, 2))
    assert hpa.load(path)["conv1"].stride == (2, 2)


def test_unknown_layer_type_is_skipped(tmp_path):
    torch.manual_seed(6)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3)
    mystery = {"name": "mystery", "type": "frobnicate", "gain": 2.0}
    path = tmp_path / "odd.mat"
    mcn.export_simplenn([conv1, nn.ReLU(), mystery, conv2], path, input_size=SIZE)
    graph = hpa.load(path)
    assert [layer.name for layer in graph] == ["conv1", "conv2"]
    assert [s.name for s in graph.skipped] == ["mystery"] and "frobnicate" in graph.skipped[0].reason
    assert "unknown MatConvNet layer type 'frobnicate'" in graph.skipped[0].reason
    assert graph["conv2"].predecessors == ("conv1",)
    assert graph["conv2"].via["conv1"] == ("relu", "frobnicate")
    assert graph["conv2"].groups is None and graph["conv2"].input_shape is None  # unknown after the mystery op
    assert graph["conv1"].activation == "relu"

    dag_path = tmp_path / "odd_dag.mat"
    nodes = mcn.chain([conv1, nn.ReLU(), {"type": "dagnn.Mystery", "block": {"k": 1.0}}, conv2])
    mcn.export_dagnn(nodes, dag_path, input_size=SIZE)
    graph = hpa.load(dag_path)
    assert [layer.name for layer in graph] == ["layer1", "layer4"]
    assert "dagnn.Mystery" in graph.skipped[0].reason


def test_only_unknown_layers_is_unsupported(tmp_path):
    path = tmp_path / "none.mat"
    mcn.export_simplenn([{"name": "x", "type": "frobnicate"}], path, input_size=SIZE)
    with pytest.raises(UnsupportedModelError, match="no conv layers"):
        hpa.load(path)


def test_input_size_option_and_file(tmp_path):
    model = plain_net()
    path = tmp_path / "net.mat"
    mcn.export_simplenn(model, path, input_size=SIZE)
    assert hpa.load(path, input_size="3,64,64")["conv1"].output_shape == (8, 64, 64)
    with pytest.raises(OptionError, match="C,H,W"):
        hpa.load(path, input_size="3,64")
    with pytest.raises(OptionError, match="--weights"):
        hpa.load(path, weights="none")


def test_projection_statistic_runs(tmp_path):
    path = tmp_path / "net.mat"
    mcn.export_dagnn(residual_net().dag(), path, input_size=SIZE)
    result = hpa.scan(path, statistics=["projection"])
    assert set(result.statistics["projection"].layers) == {"stem", "a", "b", "c", "head"}


# -- bad files ---------------------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    files = {}
    no_layers = tmp_path / "no_layers.mat"
    __import__("scipy.io").io.savemat(no_layers, {"meta": {"classes": mcn.cell(["a"])}})
    files["no_layers"] = (no_layers, "no 'layers' variable")
    empty_layers = tmp_path / "empty_layers.mat"
    __import__("scipy.io").io.savemat(empty_layers, {"layers": mcn.cell([])})
    files["empty_layers"] = (empty_layers, "no layers")
    v73 = tmp_path / "v73.mat"
    mcn.write_v73_header(v73)
    files["v73"] = (v73, "v7.3")
    mcos = tmp_path / "object.mat"
    mcn.write_mcos_object(mcos)
    files["mcos"] = (mcos, "MATLAB object \\(dagnn.DagNN\\)")
    not_mat = tmp_path / "notes.mat"
    not_mat.write_text("this is not a MATLAB file\n")
    files["not_mat"] = (not_mat, "not a MATLAB .mat file")
    good = tmp_path / "good.mat"
    mcn.export_simplenn(plain_net(), good, input_size=SIZE)
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (truncated, "truncated or damaged")
    unknown_only = tmp_path / "unknown_only.mat"
    mcn.export_simplenn([{"name": "x", "type": "frobnicate"}], unknown_only, input_size=SIZE)
    files["unknown_only"] = (unknown_only, "no conv layers")
    return files


BAD = ["no_layers", "empty_layers", "v73", "mcos", "not_mat", "truncated", "unknown_only"]


@pytest.mark.parametrize("case", BAD)
def test_bad_file_raises_one_line(tmp_path, case):
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(hpa.HpaError, match=message) as info:
        hpa.load(path)
    assert "\n" not in str(info.value)
    if case != "unknown_only":
        assert isinstance(info.value, LoadError)


def test_mcos_file_is_what_scipy_calls_opaque(tmp_path):
    from scipy.io.matlab import MatlabOpaque
    path = tmp_path / "object.mat"
    mcn.write_mcos_object(path, "net", "dagnn.DagNN")
    values = __import__("scipy.io").io.loadmat(path)
    assert isinstance(values["None"], MatlabOpaque)
    assert values["None"][0]["s2"] == b"dagnn.DagNN"


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_file(tmp_path, case, run_hpa):
    path, _ = _bad_files(tmp_path)[case]
    out = tmp_path / "out"
    proc = run_hpa("scan", path, "--out", out, env={"HPA_DEBUG": ""})
    assert_bad_input(proc)
    assert not out.exists()


def test_cli_scans_mat_file(tmp_path, run_hpa):
    path = tmp_path / "res.mat"
    mcn.export_dagnn(residual_net().dag(), path, input_size=SIZE)
    out = tmp_path / "out"
    proc = run_hpa("scan", path, "--stat", "projection", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "result.json").exists()


def test_a_file_written_by_hand_from_the_format_description(tmp_path):
    """Not through mcn_export: MatConvNet's documented layout, element by element.

    A conv's ``weights{1}`` is H x W x D x K (``filters(h, w, d, k)`` is tap (h, w)
    of input channel d in filter k), ``weights{2}`` has K biases, and ``pad`` is
    ``[top bottom left right]``.  A non-square kernel and asymmetric padding make
    a swapped axis or pair visible.
    """
    import scipy.io

    rng = np.random.default_rng(0)
    k, d, h, w = 4, 3, 3, 2
    torch_weight = rng.standard_normal((k, d, h, w)).astype(np.float32)  # (K, D, H, W)
    filters = np.zeros((h, w, d, k), np.float32)
    for index in np.ndindex(k, d, h, w):
        o, c, y, x = index
        filters[y, x, c, o] = torch_weight[index]
    biases = np.arange(1, k + 1, dtype=np.float32).reshape(1, k)
    weights = np.empty((1, 2), dtype=object)  # a 1x2 cell
    weights[0, 0], weights[0, 1] = filters, biases
    layer = {"name": "c1", "type": "conv", "weights": weights,
             "pad": np.array([[1.0, 2.0, 0.0, 1.0]]), "stride": np.array([[1.0, 1.0]]),
             "dilate": np.array([[1.0, 1.0]])}
    layers = np.empty((1, 1), dtype=object)
    layers[0, 0] = layer
    meta = {"inputs": {"name": "input", "size": np.array([[7.0, 5.0, float(d), 1.0]])}}
    path = tmp_path / "hand.mat"
    scipy.io.savemat(path, {"layers": layers, "meta": meta})
    [got] = list(hpa.load(path))
    np.testing.assert_array_equal(got.weight, torch_weight)
    np.testing.assert_array_equal(got.bias, biases.ravel())
    assert got.padding == ((1, 2), (0, 1)) and got.kernel_size == (3, 2)
    x = torch.zeros(1, d, 7, 5)
    want = F.conv2d(F.pad(x, (0, 1, 1, 2)), torch.from_numpy(torch_weight))  # F.pad: (left, right, top, bottom)
    assert got.input_shape == (d, 7, 5) and got.output_shape == tuple(want.shape[1:])


# -- a big-endian MAT-file without a .mat suffix (issue 17) --------------------------------------

# MAT-file v5 data types (the MATLAB "MAT-File Format" document, table 1-1) -> bytes per element.
_MI_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _swapped_elements(data: bytes) -> bytes:
    """A sequence of v5 data elements from little- to big-endian: tags, numbers, and miMATRIX contents."""
    out, pos = bytearray(), 0
    while pos < len(data):
        word = int.from_bytes(data[pos:pos + 4], "little")
        if word >> 16:  # small data element: type and size in one word, 4 bytes of data after it
            kind, size, start, padded = word & 0xFFFF, word >> 16, pos + 4, 4
            out += word.to_bytes(4, "big")  # the word read as one uint32 keeps its meaning
        else:
            kind, size = word, int.from_bytes(data[pos + 4:pos + 8], "little")
            start, padded = pos + 8, (size + 7) // 8 * 8
            out += kind.to_bytes(4, "big") + size.to_bytes(4, "big")
        payload = data[start:start + size]
        assert kind != _MI_COMPRESSED, "write the file uncompressed"
        if kind == _MI_MATRIX:
            payload = _swapped_elements(payload)
        else:
            width = _MI_SIZES[kind]
            payload = b"".join(payload[i:i + width][::-1] for i in range(0, size, width))
        out += payload + bytes(padded - size)
        pos = start + padded
    return bytes(out)


def to_big_endian(source: Path, target: Path) -> None:
    """Byte-swap a little-endian v5 MAT-file that scipy wrote (scipy writes native order only)."""
    data = source.read_bytes()
    assert data[126:128] == b"IM", "a little-endian file"
    header = data[:124] + data[124:126][::-1] + b"MI"  # the version word in big-endian order, the endian mark
    target.write_bytes(header + _swapped_elements(data[128:]))


def test_big_endian_file_without_suffix_is_sniffed_and_read(tmp_path):
    import scipy.io

    model = plain_net()
    little = tmp_path / "net.mat"
    mcn.export_simplenn(model, little, input_size=SIZE)
    big = tmp_path / "vgg_from_a_sparc"
    to_big_endian(little, big)
    assert big.read_bytes()[126:128] == b"MI" and big.read_bytes() != little.read_bytes()
    # the swap is a faithful copy: scipy reads the same arrays back from both
    want, got = scipy.io.loadmat(little), scipy.io.loadmat(big, appendmat=False)
    layer = lambda mat: mat["layers"][0, 0][0, 0]  # noqa: E731
    np.testing.assert_array_equal(layer(got)["weights"][0, 0], layer(want)["weights"][0, 0])
    from hpa.sniff import detect

    assert detect(big) == "matlab"
    graph = hpa.load(big)
    assert graph.source["loader"] == "matconvnet"
    expected = hpa.load(little)
    assert [l.name for l in graph] == [l.name for l in expected]
    for a, b in zip(graph, expected):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
        assert a.stride == b.stride and a.padding == b.padding
    assert_same_graph(graph, hpa.load(model, input_size=SIZE))
