"""hpa/graph.py on its own: Layer, ConvGraph, Skipped, op names, unique names, output sizes.

Expected values come from real torch modules and functions (shapes, channel
counts, output lengths) or are read off the test's own inputs.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpa.graph import (ACTIVATIONS, CONV_KINDS, ELEMENTWISE, INFERABLE_FIELDS, INFERENCE_IDENTITIES, LAYER_KINDS,
                       TRANSPOSED_KINDS, ConvGraph, Layer, Skipped, conv_output_size, unique_name)


def _layer(name="conv", index=0, kind="conv2d", shape=(4, 3, 3, 3), **fields) -> Layer:
    return Layer(name=name, index=index, kind=kind, weight=np.zeros(shape, np.float32), **fields)


# -- conv_output_size against torch ------------------------------------------------------------

def _torch_length(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int) -> int | None:
    """The output length torch computes for a 1-D conv, or None when torch refuses the input."""
    x = F.pad(torch.zeros(1, 1, size), pad)
    try:
        return F.conv1d(x, torch.zeros(1, 1, kernel), stride=stride, dilation=dilation).shape[-1]
    except RuntimeError:  # the (padded) input is shorter than the dilated kernel
        return None


def test_conv_output_size_matches_torch_conv1d_over_a_grid():
    pads = [(0, 0), (0, 1), (1, 0), (2, 1), (1, 2)]
    grid = itertools.product(range(1, 9), range(1, 4), range(1, 4), pads, range(1, 4))
    for size, kernel, stride, (begin, end), dilation in grid:
        expected = _torch_length(size, kernel, stride, (begin, end), dilation)
        got = conv_output_size(size, kernel, stride, (begin, end), dilation)
        if expected is None:
            assert got < 1, (size, kernel, stride, begin, end, dilation)
        else:
            assert got == expected, (size, kernel, stride, begin, end, dilation)


def test_conv_output_size_matches_torch_conv2d_per_axis():
    rng = random.Random(3)
    for _ in range(150):
        kernel = [rng.randint(1, 4) for _ in range(2)]
        dilation = [rng.randint(1, 2) for _ in range(2)]
        size = [rng.randint(d * (k - 1) + 1, 12) for k, d in zip(kernel, dilation)]  # torch accepts it
        stride = [rng.randint(1, 3) for _ in range(2)]
        pads = [(rng.randint(0, 2), rng.randint(0, 2)) for _ in range(2)]
        x = F.pad(torch.zeros(1, 1, *size), (*pads[1], *pads[0]))  # F.pad lists the last axis first
        out = F.conv2d(x, torch.zeros(1, 1, *kernel), stride=stride, dilation=dilation).shape[2:]
        for axis in range(2):
            assert conv_output_size(size[axis], kernel[axis], stride[axis], pads[axis], dilation[axis]) == out[axis]


def test_conv_output_size_defaults_are_stride_1_no_padding_no_dilation():
    assert conv_output_size(10, 3) == 8  # a valid 3-tap conv drops one sample at each end


# -- Layer properties against real modules ---------------------------------------------------------

@pytest.mark.parametrize("module, kind", [
    (nn.Conv1d(6, 9, 5), "conv1d"),
    (nn.Conv2d(6, 9, (3, 2), groups=3), "conv2d"),
    (nn.Conv2d(8, 8, 3, groups=8), "conv2d"),  # depthwise
    (nn.Conv3d(4, 6, (1, 2, 3), groups=2), "conv3d"),
    (nn.ConvTranspose1d(4, 10, 3), "conv_transpose1d"),
    (nn.ConvTranspose2d(6, 9, (2, 3), groups=3), "conv_transpose2d"),
    (nn.ConvTranspose3d(4, 6, 2, groups=2), "conv_transpose3d"),
])
def test_layer_channels_and_kernel_match_the_torch_module(module, kind):
    layer = _layer(kind=kind, shape=(), groups=module.groups)
    layer.weight = module.weight.detach().numpy()
    assert layer.out_channels == module.out_channels
    assert layer.in_channels == module.in_channels
    assert layer.kernel_size == tuple(module.kernel_size)
    assert all(type(k) is int for k in layer.kernel_size)
    assert layer.spatial_dims == len(module.kernel_size)
    assert layer.transposed == isinstance(module, nn.modules.conv._ConvTransposeNd)


def test_linear_layer_properties_match_nn_linear():
    module = nn.Linear(5, 3)
    layer = _layer(kind="linear", shape=())
    layer.weight = module.weight.detach().numpy()
    assert (layer.out_channels, layer.in_channels) == (module.out_features, module.in_features)
    assert layer.spatial_dims == 0 and layer.kernel_size == () and not layer.transposed


def test_unknown_groups_leave_a_convs_input_channels_unknown():
    """A bare state_dict cannot tell groups; (out, in/groups) then gives no input width."""
    layer = _layer(shape=(8, 2, 3, 3), groups=None)
    assert layer.out_channels == 8
    assert layer.in_channels is None


def test_unknown_groups_do_not_hide_a_transposed_convs_input_channels():
    """(in, out/groups, ...): the input width is the first axis whatever the groups."""
    layer = _layer(kind="conv_transpose2d", shape=(6, 3, 2, 2), groups=None)
    assert layer.in_channels == 6


def test_kind_tables_are_consistent():
    assert set(LAYER_KINDS) == set(CONV_KINDS) | set(TRANSPOSED_KINDS) | {"linear"}
    assert len(LAYER_KINDS) == len(set(LAYER_KINDS))
    # The transposed kinds are torch's own function names, like the conv kinds.
    for kind in LAYER_KINDS:
        assert callable(getattr(F, kind))


def test_layer_repr_is_short_and_holds_no_weights():
    layer = _layer(shape=(64, 32, 3, 3))
    layer.weight = np.full(layer.weight.shape, 0.123456, np.float32)
    text = repr(layer)
    assert "0.123" not in text and len(text) < 100
    assert "'conv'" in text and "64x32x3x3" in text


# -- attributes() ---------------------------------------------------------------------------

def _full_layer(**overrides) -> Layer:
    fields = dict(
        name="block.conv", index=3, kind="conv2d", weight=np.zeros((8, 2, 3, 3), np.float32),
        bias=np.zeros(8), stride=(2, 1), padding=((1, 0), (1, 2)), dilation=(1, 1), groups=2,
        activation="leaky_relu", activation_params={"negative_slope": 0.1}, bn_folded=True,
        input_shape=(4, 9, 9), output_shape=(8, 5, 10), predecessors=("input", "stem"),
        via={"input": (), "stem": ("relu", "add")}, channel_bias=np.zeros((8, 2)),
        inferred=("stride", "padding"), params={"weight": "block.conv.weight", "bn.eps": 1e-5},
        branch="If_0/then_branch", quantization={"format": "QLinearConv", "dtype": "int8", "per_channel": True})
    fields.update(overrides)
    return Layer(**fields)


def _assert_plain_json(value, where="attributes"):
    """Only the types json writes back (no numpy scalars, no tuples)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, where
            _assert_plain_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_plain_json(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{where}: {type(value).__name__}"


def test_attributes_describe_the_layer_in_plain_json():
    attrs = _full_layer().attributes()
    assert attrs == {
        "index": 3, "name": "block.conv", "kind": "conv2d", "out_channels": 8, "in_channels": 4,
        "kernel_size": [3, 3], "stride": [2, 1], "padding": [[1, 0], [1, 2]], "dilation": [1, 1], "groups": 2,
        "output_padding": None, "activation": "leaky_relu", "activation_params": {"negative_slope": 0.1},
        "bn_folded": True, "input_shape": [4, 9, 9],
        "output_shape": [8, 5, 10], "predecessors": ["input", "stem"], "via": {"input": [], "stem": ["relu", "add"]},
        "channel_bias": True, "inferred": ["stride", "padding"],
        "params": {"weight": "block.conv.weight", "bn.eps": 1e-5}, "branch": "If_0/then_branch",
        "quantization": {"format": "QLinearConv", "dtype": "int8", "per_channel": True},
    }
    _assert_plain_json(attrs)
    assert json.loads(json.dumps(attrs)) == attrs


def test_attributes_turn_numpy_scalars_into_plain_json():
    """Loaders read numbers out of arrays; the JSON must not depend on them converting first."""
    i = np.int64
    layer = _full_layer(index=i(3), stride=(i(2), i(1)), padding=((i(1), i(0)), (i(1), i(2))),
                        dilation=(i(1), i(1)), groups=i(2), bn_folded=np.bool_(True),
                        input_shape=(i(4), i(9), i(9)), output_shape=(i(8), i(5), i(10)),
                        params={"weight": "w", "bn.eps": np.float32(1e-3)})
    attrs = layer.attributes()
    _assert_plain_json(attrs)
    text = json.dumps(attrs)
    assert json.loads(text)["padding"] == [[1, 0], [1, 2]]
    assert json.loads(text)["params"]["bn.eps"] == pytest.approx(1e-3)


def test_attributes_of_a_bare_state_dict_layer_keep_unknowns_as_null():
    layer = _layer(shape=(8, 2, 3, 3), groups=None, activation=None, inferred=INFERABLE_FIELDS)
    layer.stride = layer.padding = layer.dilation = None
    attrs = layer.attributes()
    assert attrs["in_channels"] is None and attrs["groups"] is None and attrs["activation"] is None
    assert attrs["stride"] is None and attrs["padding"] is None and attrs["dilation"] is None
    assert attrs["inferred"] == list(INFERABLE_FIELDS) and attrs["params"] == {} and attrs["branch"] is None
    assert json.loads(json.dumps(attrs)) == attrs


def test_attributes_report_output_padding_only_for_transposed_convs():
    up = _layer(kind="conv_transpose2d", shape=(4, 2, 2, 2), output_padding=(1, 0))
    assert up.attributes()["output_padding"] == [1, 0]
    assert _layer(output_padding=(1, 0)).attributes()["output_padding"] is None


def test_inferable_fields_are_layer_fields():
    assert set(INFERABLE_FIELDS) <= set(Layer.__dataclass_fields__)


# -- ConvGraph ---------------------------------------------------------------------------------

def _graph(**source) -> ConvGraph:
    """input -> a -> b;  a, b -> c (concatenation);  c -> fc"""
    layers = [
        _layer("a", 0, predecessors=("input",)),
        _layer("b", 1, predecessors=("a",), via={"a": ("relu",)}),
        _layer("c", 2, predecessors=("a", "b"), via={"a": ("cat",), "b": ("cat",)}),
        _layer("fc", 3, kind="linear", shape=(10, 4), predecessors=("c",)),
    ]
    return ConvGraph(layers, source=source, input_shape=(3, 8, 8))


def test_graph_refuses_duplicate_layer_names():
    with pytest.raises(ValueError, match="unique"):
        ConvGraph([_layer("a", 0), _layer("b", 1), _layer("a", 2)])


def test_graph_lookup_membership_length_and_order():
    graph = _graph()
    assert [layer.name for layer in graph] == ["a", "b", "c", "fc"]
    assert len(graph) == 4
    assert graph["c"] is graph.layers[2]
    assert "b" in graph and "input" not in graph and "zz" not in graph and 3 not in graph
    with pytest.raises(KeyError):
        graph["zz"]


def test_graph_iterates_in_list_order_not_by_index():
    layers = [_layer("late", 5), _layer("early", 0)]
    assert [layer.name for layer in ConvGraph(layers)] == ["late", "early"]


def test_successors_are_the_layers_that_list_a_name_as_predecessor():
    graph = _graph()
    assert [layer.name for layer in graph.successors("a")] == ["b", "c"]
    assert [layer.name for layer in graph.successors("input")] == ["a"]
    assert graph.successors("fc") == []


def test_summary_counts_layers_per_kind():
    graph = _graph()
    assert dict(graph.summary()) == dict(Counter(layer.kind for layer in graph.layers)) == {"conv2d": 3, "linear": 1}


def test_graph_repr_is_one_short_line_without_weights():
    layers = [_layer(f"l{i}", i, shape=(256, 256, 3, 3)) for i in range(20)]
    for layer in layers:
        layer.weight = np.full(layer.weight.shape, 0.123456, np.float32)
    graph = ConvGraph(layers, source={"spec": "zoo:net"}, skipped=[Skipped("x", "why")], input_shape=(3, 32, 32))
    text = repr(graph)
    assert "\n" not in text and len(text) < 120 and "0.123" not in text
    assert "zoo:net" in text and "3x32x32" in text and "20 conv2d" in text and "1 skipped" in text


@pytest.mark.parametrize("source, shape", [({}, None), ({}, (3, 8, 8)), ({"spec": "s"}, None)])
def test_graph_repr_has_no_doubled_spaces(source, shape):
    text = repr(ConvGraph([_layer()], source=source, input_shape=shape))
    assert "  " not in text and " :" not in text


def test_empty_graph_repr_says_no_layers():
    assert "no layers" in repr(ConvGraph([]))


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.caption = ""
        self._where = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._where = tag

    def handle_endtag(self, tag):
        self._where = None

    def handle_data(self, data):
        if self._where == "td":
            self.cells.append(data)
        elif self._where == "caption":
            self.caption += data


def test_html_table_escapes_names_and_shows_one_row_per_layer():
    names = ["a<b>&c", "<script>x</script>", "plain"]
    graph = ConvGraph([_layer(name, i) for i, name in enumerate(names)], source={"spec": "<img src=x>&"})
    parser = _Cells()
    parser.feed(graph._repr_html_())
    assert "script" not in parser.tags and "img" not in parser.tags and "b" not in parser.tags
    assert parser.tags.count("tr") == 1 + len(names)  # header + one row per layer
    assert [cell for cell in parser.cells if cell in names] == names  # each name back, unescaped
    assert "<img src=x>&" in parser.caption


def test_html_table_marks_unknowns():
    layer = _layer(groups=None, activation=None)
    layer.stride = None
    parser = _Cells()
    parser.feed(ConvGraph([layer])._repr_html_())
    assert parser.cells.count("?") == 3


# -- Skipped -----------------------------------------------------------------------------------

def test_skipped_to_dict_names_the_statistic_only_when_there_is_one():
    assert Skipped("fc", "not a conv").to_dict() == {"name": "fc", "reason": "not a conv"}
    entry = Skipped("fc", "not a conv", "cones").to_dict()
    assert entry == {"name": "fc", "reason": "not a conv", "statistic": "cones"}
    assert json.loads(json.dumps(entry)) == entry


# -- unique_name -------------------------------------------------------------------------------

def test_unique_name_numbers_repeats_from_2():
    used: dict[str, int] = {}
    assert [unique_name("a", used) for _ in range(4)] == ["a", "a#2", "a#3", "a#4"]


def test_unique_name_counts_each_name_on_its_own():
    used: dict[str, int] = {}
    assert [unique_name(n, used) for n in ["a", "b", "a", "c", "b"]] == ["a", "b", "a#2", "c", "b#2"]


@pytest.mark.parametrize("order", [
    ["a#2", "a", "a"], ["a", "a", "a#2"], ["a", "a#2", "a", "a#2", "a"], ["x#3", "x", "x", "x", "x#3#2", "x#3"],
])
def test_unique_name_never_hands_out_a_name_twice(order):
    """A source name that itself ends in ``#2`` must not collide with a generated one."""
    used: dict[str, int] = {}
    given = [unique_name(name, used) for name in order]
    assert len(set(given)) == len(given), given
    assert given[0] == order[0]  # the first of each name is kept as it is
    ConvGraph([_layer(name, i) for i, name in enumerate(given)])  # and a graph accepts them


# -- canonical op names ------------------------------------------------------------------------

def test_elementwise_is_activations_plus_identities():
    assert ELEMENTWISE == ACTIVATIONS | INFERENCE_IDENTITIES
    assert not ACTIVATIONS & INFERENCE_IDENTITIES


def _torch_activation(name: str):
    """The torch function a canonical activation name stands for, with inference-time arguments."""
    special = {
        "prelu": lambda x: F.prelu(x, torch.linspace(-0.5, 0.5, x.shape[1])),
        "threshold": lambda x: F.threshold(x, 0.1, -2.0),
        "clamp": lambda x: torch.clamp(x, min=0.0, max=1.0),
        "rrelu": lambda x: F.rrelu(x, training=False),
    }
    return special.get(name) or getattr(F, name)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_acts_element_by_element(name):
    """A plane keeps its size, and moving pixels commutes with the op (docs/statistics.md: stacked pairs)."""
    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    f = _torch_activation(name)
    rows, cols = torch.randperm(6), torch.randperm(8)
    y = f(x)
    assert y.shape == x.shape
    torch.testing.assert_close(f(x[:, :, rows][..., cols]), y[:, :, rows][..., cols])


def _torch_spellings() -> dict[str, str]:
    from hpa.backends.torch_trace import _SPELLINGS

    return _SPELLINGS


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_is_a_name_the_torch_tracer_can_record(name):
    """The tracer keeps torch's function names except the few in its spelling map."""
    spelled = set(_torch_spellings().values())
    assert name in spelled or callable(getattr(F, name, None)) or callable(getattr(torch, name, None))


def test_torch_tracer_spellings_map_onto_canonical_names():
    assert set(_torch_spellings().values()) <= ELEMENTWISE


def test_onnx_activation_ops_emit_canonical_activation_names():
    from hpa.backends.onnx.activations import _IDENTITY_OPS, ACTIVATION_OPS, TRANSPARENT

    assert set(ACTIVATION_OPS.values()) <= ACTIVATIONS
    assert set(_IDENTITY_OPS.values()) <= INFERENCE_IDENTITIES
    assert TRANSPARENT == set(_IDENTITY_OPS)  # none dropped for a misspelt canonical name


def test_matconvnet_activation_blocks_emit_canonical_activation_names():
    """MatConvNet's nonlinearity blocks are vl_nnrelu (leak: leaky ReLU), vl_nnsigmoid and tanh."""
    from hpa.backends.matconvnet import _IDENTITIES, VIA_NAMES

    assert {VIA_NAMES[t] for t in ("relu", "sigmoid", "tanh")} | {"leaky_relu"} <= ACTIVATIONS
    assert "dropout" in _IDENTITIES


@pytest.mark.parametrize("module, kind", [(nn.Conv2d(6, 8, (3, 5), stride=2, padding=1, dilation=2, groups=2), "conv2d"),
                                          (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), "conv_transpose2d"),
                                          (nn.Linear(7, 3), "linear")])
def test_from_attributes_inverts_attributes_with_placeholder_weights(module, kind):
    """JSON attributes -> Layer -> attributes is the identity; weights are NaN of the real shape, no memory."""
    weight = module.weight.detach().numpy()
    layer = Layer(name="x", index=3, kind=kind, weight=weight,
                  stride=None if kind == "linear" else tuple(module.stride),
                  dilation=None if kind == "linear" else tuple(module.dilation),
                  padding=None if kind == "linear" else tuple((p, p) for p in module.padding),
                  groups=getattr(module, "groups", 1), inferred=("stride",), params={"weight": "x.weight"},
                  branch="If_0/then_branch", activation="leaky_relu", activation_params={"negative_slope": 0.2},
                  quantization={"format": "ConvInteger", "dtype": "uint8", "per_channel": False})
    entry = json.loads(json.dumps(layer.attributes()))
    back = Layer.from_attributes(entry)
    assert back.attributes() == layer.attributes()
    assert back.activation_params == {"negative_slope": 0.2}  # a run: graph keeps the leaky slope
    assert back.weight.shape == weight.shape and np.isnan(back.weight).all() and back.weight.strides == (0,) * weight.ndim
