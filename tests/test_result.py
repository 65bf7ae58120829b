"""ScanResult: read back from result.json, and rendered by the statistics it was computed with."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import hpa
from hpa.errors import LoadError
from hpa.graph import INPUT, ConvGraph, Layer
from hpa.api import read_result
from hpa.registry import Statistic, StatisticResult
from hpa.result import ScanResult


def _graph(seed: int = 0) -> ConvGraph:
    """conv 1->4 (3x3), conv 4->4 (3x3, stacked after a ReLU), conv 4->8 grouped 1x1, then a linear layer."""
    rng = np.random.default_rng(seed)
    plane = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), activation="relu")
    layers = [
        Layer(name="conv1", index=0, kind="conv2d", weight=rng.normal(size=(4, 1, 3, 3)), bias=np.zeros(4),
              input_shape=(1, 6, 6), output_shape=(4, 6, 6), predecessors=(INPUT,), **plane),
        Layer(name="conv2", index=1, kind="conv2d", weight=rng.normal(size=(4, 4, 3, 3)) - 0.3, bias=np.zeros(4),
              input_shape=(4, 6, 6), output_shape=(4, 6, 6), predecessors=("conv1",), via={"conv1": ("relu",)},
              **plane),
        Layer(name="mix", index=2, kind="conv2d", weight=rng.normal(size=(8, 2, 1, 1)), groups=2, stride=(1, 1),
              padding=((0, 0), (0, 0)), dilation=(1, 1), input_shape=(4, 6, 6), output_shape=(8, 6, 6),
              predecessors=("conv2",), params={"weight": "mix.weight"}, inferred=("activation",)),
        Layer(name="fc", index=3, kind="linear", weight=rng.normal(size=(10, 288)), predecessors=("mix",)),
    ]
    return ConvGraph(layers, source={"spec": "test:small", "model": "small", "weights": "trained",
                                     "input_size": [1, 6, 6]}, input_shape=(1, 6, 6))


@pytest.fixture(scope="module")
def scanned() -> ScanResult:
    from hpa.plugins import registries
    from hpa.registry import StatisticContext

    graph, init = _graph(0), _graph(1)
    init.source.update(weights="none", role="init")
    stats = [registries()["statistics"].get(n) for n in ("projection", "cones")]
    context = StatisticContext(options={"bins": 20, "skip_1x1": False, "with_linear": False}, init=init)
    return ScanResult(graph=graph, init=init, statistics={s.name: s.compute(graph, context) for s in stats},
                      options={"bins": 20}, not_run={"other": "does not apply"},
                      statistic_plugins={s.name: s for s in stats})


def test_json_round_trip_is_exact(scanned):
    data = scanned.to_dict()
    again = ScanResult.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert [layer.name for layer in again.graph] == ["conv1", "conv2", "mix", "fc"]
    assert again.statistics["cones"].extra["pairs"] == data["pairs"]  # back with the statistic that wrote it
    assert {s.reason for s in again.statistics["projection"].skipped} == \
        {s.reason for s in scanned.statistics["projection"].skipped}
    assert again.init is not None and again.init.source["weights"] == "none"


def test_read_back_layers_have_shapes_but_no_weights(scanned):
    again = ScanResult.from_dict(scanned.to_dict())
    for layer, original in zip(again.graph, scanned.graph):
        assert layer.weight.shape == original.weight.shape
        assert layer.weight.strides == (0,) * layer.weight.ndim  # a placeholder: no memory per element
        assert np.isnan(layer.weight).all()
        assert layer.attributes() == original.attributes()


def test_result_keys_only_grow(scanned):
    """result.json keeps every key of schema 1 (only keys are added)."""
    data = scanned.to_dict()
    assert {"schema_version", "hpa_version", "model", "init", "options", "statistics", "statistics_not_run",
            "layers", "skipped", "pairs"} <= set(data)
    assert data["statistic_extra_keys"] == {"projection": [], "cones": ["pairs"]}  # in the order they ran


def test_result_written_before_statistic_extra_keys_still_renders(scanned, tmp_path):
    data = scanned.to_dict()
    del data["statistic_extra_keys"]  # as hpa wrote result.json before this key existed
    again = ScanResult.from_dict(data, scanned.statistic_plugins.values())
    assert again.statistics["cones"].extra["pairs"] == data["pairs"]
    assert again.to_dict()["pairs"] == data["pairs"]
    names = {p.name for p in again.plot(tmp_path)}
    assert {"cones_states.png", "projection_n_l.png", "projection_histograms.png"} <= names


def test_read_result_from_a_file_or_its_folder(scanned, tmp_path):
    (tmp_path / "result.json").write_text(scanned.to_json())
    for path in (tmp_path / "result.json", tmp_path):
        assert read_result(path).to_dict() == scanned.to_dict()


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ('{"layers": []}', "not an hpa result"),
    ('[1, 2]', "not an hpa result"),
    ('{"schema_version": 99, "layers": []}', "upgrade hpa"),
])
def test_bad_result_files_are_refused_in_one_line(tmp_path, content, words):
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LoadError, match=words) as caught:
        read_result(path)
    assert "\n" not in str(caught.value)


# -- the statistics travel with the result -------------------------------------------------------

def _max_abs_statistic() -> Statistic:
    def compute(graph, context):
        return StatisticResult(layers={l.name: {"max": float(np.abs(l.weight).max())} for l in graph})

    def plot(result, directory, fmt):
        path = directory / f"max_abs.{fmt}"
        values = result.statistics["max_abs"].layers
        path.write_text(json.dumps(values))  # the third party draws however it likes
        return [path]

    return Statistic(name="max_abs", compute=compute, plot=plot)


def test_a_result_made_with_a_temporary_plugin_still_renders(temporary_plugin, tmp_path):
    stat = _max_abs_statistic()

    class Plugin:
        @hpa.hookimpl
        def register_statistics(self, register):
            register(stat)

    temporary_plugin(Plugin(), "max-abs-test")
    result = hpa.scan(_graph(), statistics=["max_abs", "projection"])
    from hpa import plugins

    plugins.unregister("max-abs-test")  # gone from the registry before the figures are drawn
    files = {p.name for p in result.plot(tmp_path)}
    assert {"max_abs.png", "projection_n_l.png"} <= files
    assert json.loads((tmp_path / "max_abs.png").read_text())["conv2"]["max"] == \
        pytest.approx(float(np.abs(_graph().layers[1].weight).max()))


def test_a_third_party_statistic_renders_from_json_when_given(tmp_path):
    stat = _max_abs_statistic()
    graph = _graph()
    result = ScanResult(graph=graph, statistics={"max_abs": stat.compute(graph, None)},
                        statistic_plugins={"max_abs": stat})
    (tmp_path / "result.json").write_text(result.to_json())
    again = read_result(tmp_path / "result.json", statistics=[stat])
    assert [p.name for p in again.plot(tmp_path / "a")] == ["max_abs.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_result(tmp_path / "result.json").plot(tmp_path / "b") == []
    assert any("max_abs" in str(w.message) and "not installed" in str(w.message) for w in caught)
