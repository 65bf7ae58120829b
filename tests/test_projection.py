"""The projection statistic against a direct per-filter loop and the invariances of docs/statistics.md §1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpa.graph import ConvGraph, Layer
from hpa.registry import StatisticContext
from hpa_plugins import projection


def direct_cosine(w: np.ndarray) -> float:
    """c = sum(w) / (||w|| * sqrt(n)), written out element by element."""
    total, squares = 0.0, 0.0
    for value in w.ravel().tolist():
        total += value
        squares += value * value
    return total / (math.sqrt(squares) * math.sqrt(w.size))


def conv(name="c", weight=None, kind="conv2d", **kw) -> Layer:
    return Layer(name=name, index=0, kind=kind, weight=weight, **kw)


def scan_layers(*layers, init=None, **options):
    graph = ConvGraph(list(layers))
    ctx = StatisticContext(options={"bins": 40, **options}, init=init)
    return projection.compute(graph, ctx)


@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (16, 8, 1, 1), (10, 4, 5), (6, 2, 3, 3, 3), (7, 1, 3, 3)])
def test_cosines_match_a_direct_loop(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.normal(size=shape).astype(np.float32)
    values = scan_layers(conv(weight=w, kind=f"conv{len(shape) - 2}d")).layers["c"]
    expected = [direct_cosine(w[i].astype(np.float64)) for i in range(shape[0])]
    np.testing.assert_allclose(values["cosines"], expected, rtol=0, atol=1e-12)
    assert values["n_l"] == pytest.approx(np.mean(np.array(expected) <= 0), abs=0)
    assert values["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert values["std"] == pytest.approx(np.std(expected), abs=1e-12)
    assert sum(values["histogram"]["counts"]) == shape[0]


def test_invariances():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 4, 3, 3))
    base = np.array(scan_layers(conv(weight=w)).layers["c"]["cosines"])
    scales = rng.uniform(0.01, 100, size=(32, 1, 1, 1))
    scaled = np.array(scan_layers(conv(weight=w * scales)).layers["c"]["cosines"])
    np.testing.assert_allclose(scaled, base, atol=1e-12)
    flipped = np.array(scan_layers(conv(weight=-w)).layers["c"]["cosines"])
    np.testing.assert_allclose(flipped, -base, atol=1e-12)
    order = rng.permutation(32)
    permuted = scan_layers(conv(weight=w[order])).layers["c"]
    assert permuted["n_l"] == scan_layers(conv(weight=w)).layers["c"]["n_l"]
    np.testing.assert_allclose(permuted["cosines"], base[order], atol=1e-12)


def test_dead_and_nonfinite_filters_are_counted_not_dropped():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 3, 3, 3))
    w[2] = 0.0
    w[5, 0, 0, 0] = np.nan
    w[7, 1, 1, 1] = np.inf
    result = scan_layers(conv(weight=w))
    values = result.layers["c"]
    assert values["n_filters"] == 10 and values["n_dead"] == 1 and values["n_nonfinite"] == 2
    live = [direct_cosine(w[i]) for i in range(10) if i not in (2, 5, 7)]
    assert values["n_l"] == pytest.approx(np.mean(np.array(live) <= 0), abs=0)
    assert values["cosines"][2] is None and values["cosines"][5] is None
    assert len(result.damaged) == 1 and "2 of 10 filters" in result.damaged[0]


def test_grouped_conv_uses_each_filters_own_weights():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 1, 3, 3))  # depthwise: C_g = 1
    values = scan_layers(conv(weight=w, groups=8)).layers["c"]
    np.testing.assert_allclose(values["cosines"], [direct_cosine(w[i]) for i in range(8)], atol=1e-12)


def test_transposed_conv_uses_each_output_unit_column():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 4, 3, 3))  # (in, out/groups, k, k), groups = 2 -> 8 output units
    values = scan_layers(conv(weight=w, kind="conv_transpose2d", groups=2)).layers["c"]
    expected = []
    for g in range(2):
        for j in range(4):
            expected.append(direct_cosine(w[g * 3:(g + 1) * 3, j]))
    np.testing.assert_allclose(values["cosines"], expected, atol=1e-12)


def test_linear_and_1x1_options():
    rng = np.random.default_rng(4)
    one = conv("one", rng.normal(size=(4, 4, 1, 1)))
    lin = Layer(name="fc", index=1, kind="linear", weight=rng.normal(size=(3, 5)))
    default = scan_layers(one, lin)
    assert set(default.layers) == {"one"}
    assert [(s.name, "--with-linear" in s.reason) for s in default.skipped] == [("fc", True)]
    both = scan_layers(one, lin, with_linear=True, skip_1x1=True)
    assert set(both.layers) == {"fc"}
    assert any(s.name == "one" and "--skip-1x1" in s.reason for s in both.skipped)
    np.testing.assert_allclose(both.layers["fc"]["cosines"], [direct_cosine(r) for r in lin.weight], atol=1e-12)


def test_distance_from_init_matches_definition():
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(8, 3, 3, 3))
    w = w0 + rng.normal(scale=0.1, size=w0.shape)
    init = ConvGraph([conv(weight=w0)])
    values = scan_layers(conv(weight=w), init=init).layers["c"]
    d = values["distance_from_init"]
    assert d["relative_l2"] == pytest.approx(np.sqrt(((w - w0) ** 2).sum() / (w0 ** 2).sum()), rel=1e-12)
    assert d["relative_linf"] == pytest.approx(np.abs(w - w0).max() / np.abs(w0).max(), rel=1e-12)
    np.testing.assert_allclose(values["init"]["cosines"], [direct_cosine(f) for f in w0], atol=1e-12)


def test_column_major_weights_give_the_same_cosines_without_a_copy():
    rng = np.random.default_rng(6)
    matlab = np.asfortranarray(rng.normal(size=(3, 5, 4, 7)))  # H x W x Cin x Cout, column-major
    torch_order = np.transpose(matlab, (3, 2, 0, 1))  # (Cout, Cin, H, W), not C-contiguous
    rows = projection.filter_matrix(conv(weight=torch_order))
    assert np.shares_memory(rows, matlab)
    values = scan_layers(conv(weight=torch_order)).layers["c"]
    expected = [direct_cosine(np.ascontiguousarray(torch_order[i])) for i in range(7)]
    np.testing.assert_allclose(values["cosines"], expected, atol=1e-12)


def test_a_conv_that_is_a_fully_connected_layer_follows_the_linear_rule():
    rng = np.random.default_rng(7)
    fc6 = conv("fc6", rng.normal(size=(8, 4, 7, 7)), input_shape=(4, 7, 7), output_shape=(8, 1, 1),
               padding=((0, 0), (0, 0)), dilation=(1, 1), stride=(1, 1))
    fc7 = conv("fc7", rng.normal(size=(8, 8, 1, 1)), input_shape=(8, 1, 1), output_shape=(8, 1, 1),
               padding=((0, 0), (0, 0)), dilation=(1, 1), stride=(1, 1))
    sliding = conv("conv", rng.normal(size=(8, 4, 7, 7)), input_shape=(4, 9, 9), output_shape=(8, 3, 3),
                   padding=((0, 0), (0, 0)), dilation=(1, 1), stride=(1, 1))
    default = scan_layers(fc6, fc7, sliding)
    assert set(default.layers) == {"conv"}
    assert {s.name for s in default.skipped if "fully-connected" in s.reason} == {"fc6", "fc7"}
    assert set(scan_layers(fc6, fc7, sliding, with_linear=True).layers) == {"fc6", "fc7", "conv"}


def test_threaded_path_of_a_large_layer_matches_the_formula(monkeypatch):
    """§1: ``c_i = sum(w_i) / (||w_i||_2 * sqrt(n))`` for a layer large enough to be split over threads."""
    pools = []
    real_pool = projection._pool

    def counting_pool():
        pools.append(1)
        return real_pool()

    monkeypatch.setattr(projection, "_WORKERS", 4)  # the threaded path, whatever this machine's cores
    monkeypatch.setattr(projection, "_pool", counting_pool)
    rng = np.random.default_rng(8)
    w = rng.normal(size=(330, 64, 8, 8)).astype(np.float32)  # 4096 weights per filter: > 4 chunks
    w[7] = np.abs(w[7])
    values = scan_layers(conv(weight=w)).layers["c"]
    assert pools, "the layer did not take the threaded path"
    rows = w.reshape(len(w), -1).astype(np.float64)
    expected = [math.fsum(r) / (math.sqrt(math.fsum(r * r)) * math.sqrt(r.size)) for r in rows]
    np.testing.assert_allclose(values["cosines"], expected, rtol=0, atol=1e-12)
    assert values["n_l"] == sum(c <= 0 for c in expected) / len(expected)


def test_layer_without_weights_is_listed():
    """§1: nothing is dropped silently: a layer with no weights is skipped with its reason."""
    empty = conv("empty", np.zeros((0, 3, 3, 3)))
    result = scan_layers(empty, conv("full", np.ones((2, 3, 3, 3))))
    assert set(result.layers) == {"full"}
    assert [(s.name, s.reason) for s in result.skipped] == [("empty", "layer has no weights")]
