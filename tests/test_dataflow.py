"""hpa/dataflow.py on its own: predecessors and ``via`` on small hand-built node graphs.

Each graph is drawn in the test's docstring; the expected predecessors and ops
are read off the drawing, and a brute-force enumeration of every path checks
the walk on random graphs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hpa.dataflow import predecessors
from hpa.graph import INPUT


@dataclass(eq=False)
class Node:
    """A node of a toy dataflow graph: a layer, the model input, or an op (None: an identity)."""

    op: str | None = None
    inputs: list[Node] = field(default_factory=list)
    layer: str | None = None


def _input() -> Node:
    return Node(layer=INPUT)


def _layer(name: str, *inputs: Node) -> Node:
    return Node(inputs=list(inputs), layer=name)


def _op(name: str | None, *inputs: Node) -> Node:
    return Node(op=name, inputs=list(inputs))


def _walk(*sources: Node):
    return predecessors(sources, lambda n: n.layer, lambda n: n.inputs, lambda n: n.op)


def test_a_layer_fed_by_the_model_input_has_the_input_pseudo_layer_as_predecessor():
    """input -> conv1"""
    assert _walk(_input()) == ((INPUT,), {INPUT: ()})


def test_a_chain_of_ops_is_listed_in_execution_order():
    """input -> conv1 -> relu -> max_pool2d -> flatten -> (fc)"""
    conv1 = _layer("conv1", _input())
    flat = _op("flatten", _op("max_pool2d", _op("relu", conv1)))
    assert _walk(flat) == (("conv1",), {"conv1": ("relu", "max_pool2d", "flatten")})


def test_the_walk_stops_at_the_first_layer_on_each_path():
    """input -> conv0 -> relu -> conv1 -> relu -> (conv2): conv0 and input are not predecessors."""
    conv1 = _layer("conv1", _op("relu", _layer("conv0", _input())))
    assert _walk(_op("relu", conv1)) == (("conv1",), {"conv1": ("relu",)})


def test_identities_are_passed_without_being_listed():
    """conv1 -> dropout -> relu -> identity -> (conv2); dropout and identity report op None."""
    conv1 = _layer("conv1", _input())
    source = _op(None, _op("relu", _op(None, conv1)))
    assert _walk(source) == (("conv1",), {"conv1": ("relu",)})


def test_concatenation_of_two_layers():
    """input -> a, input -> b, cat(a, b) -> (c)"""
    x = _input()
    cat = _op("cat", _layer("a", x), _layer("b", x))
    assert _walk(cat) == (("a", "b"), {"a": ("cat",), "b": ("cat",)})


def test_a_residual_add_reaches_both_the_block_input_and_the_block_output():
    """conv1 -> relu -> x;  x -> conv2 -> y;  add(x, y) -> relu -> (conv3)

    From conv1 the path is relu, add, relu; from conv2 it is add, relu.
    """
    x = _op("relu", _layer("conv1", _input()))
    y = _layer("conv2", x)
    source = _op("relu", _op("add", x, y))
    assert _walk(source) == (("conv1", "conv2"), {"conv1": ("relu", "add", "relu"), "conv2": ("add", "relu")})


def test_a_diamond_of_ops_lists_every_op_once():
    """conv1 -> relu -> (max_pool2d | avg_pool2d) -> add -> (conv2): two paths from one layer."""
    r = _op("relu", _layer("conv1", _input()))
    names, via = _walk(_op("add", _op("max_pool2d", r), _op("avg_pool2d", r)))
    assert names == ("conv1",)
    assert sorted(via["conv1"]) == sorted(["relu", "max_pool2d", "avg_pool2d", "add"])


def test_a_layer_reached_twice_through_the_same_ops_is_listed_once():
    """conv1 -> add(conv1, conv1) -> (conv2), i.e. x + x"""
    conv1 = _layer("conv1", _input())
    assert _walk(_op("add", conv1, conv1)) == (("conv1",), {"conv1": ("add",)})


def test_the_input_comes_first_then_the_layers_by_name():
    """cat(zeta, alpha, input, beta) -> (head): "alpha" sorts before "input" but input leads."""
    x = _input()
    cat = _op("cat", _layer("zeta", x), _layer("alpha", x), x, _layer("beta", x))
    names, via = _walk(cat)
    assert names == (INPUT, "alpha", "beta", "zeta")
    assert list(via) == list(names)


def test_several_sources_are_walked_together():
    """A MatConvNet sum block hands over its inputs directly: sources (relu(a), b)."""
    x = _input()
    assert _walk(_op("relu", _layer("a", x)), _layer("b", x)) == (("a", "b"), {"a": ("relu",), "b": ()})


def test_a_dead_end_without_a_layer_contributes_nothing():
    """add(conv1, constant) -> (conv2): the constant has no inputs and is no layer."""
    source = _op("add", _layer("conv1", _input()), _op("constant"))
    assert _walk(source) == (("conv1",), {"conv1": ("add",)})


def test_no_sources_give_no_predecessors():
    assert _walk() == ((), {})


def test_key_identifies_nodes_as_the_onnx_reader_does_with_value_names():
    """Nodes are value names (strings); ``key=str`` makes equal names one node.

    x -> Conv "c1" -> v1;  v1 -> Relu -> v2;  v2 -> MaxPool -> v3;  Add(v2, v3) -> v4 -> (c2)
    """
    producers = {"v2": ("relu", ["v1"]), "v3": ("max_pool2d", ["v2"]), "v4": ("add", ["v2", "v3"])}
    ends = {"v1": "c1", "x": INPUT}
    names, via = predecessors(["v4"], ends.get, lambda v: producers.get(v, (None, []))[1],
                              lambda v: producers[v][0], key=str)
    assert names == ("c1",)
    assert sorted(via["c1"]) == ["add", "max_pool2d", "relu"]


# -- against an independent enumeration of every path --------------------------------------

def _all_paths(node: Node, tail: tuple[str, ...], out: dict[str, set[tuple[str, ...]]]) -> None:
    """Every path back from ``node``: out[layer] gets the ops from the layer onwards, in order."""
    if node.layer is not None:
        out.setdefault(node.layer, set()).add(tail)
        return
    passed = (node.op, *tail) if node.op else tail
    for source in node.inputs:
        _all_paths(source, passed, out)


def _random_graph(rng: random.Random) -> list[Node]:
    """A random DAG: the input, a few layers and ops, each fed by one to three earlier nodes."""
    nodes = [_input()]
    for i in range(rng.randint(3, 12)):
        inputs = rng.sample(nodes, min(len(nodes), rng.randint(1, 3)))
        roll = rng.random()
        if roll < 0.3:
            nodes.append(_layer(f"L{i}", *inputs[:1]))
        else:
            nodes.append(_op(rng.choice(["relu", "add", "cat", None, "max_pool2d"]), *inputs))
    return nodes


def test_random_graphs_agree_with_every_path_enumerated():
    rng = random.Random(7)
    for _ in range(300):
        nodes = _random_graph(rng)
        sources = rng.sample(nodes, rng.randint(1, 2))
        paths: dict[str, set[tuple[str, ...]]] = {}
        for source in sources:
            _all_paths(source, (), paths)
        names, via = _walk(*sources)
        assert names == tuple(sorted(paths, key=lambda n: (n != INPUT, n)))
        for name, found in paths.items():
            # Every op on some path is listed, once per path's worth and nothing else.
            assert set(via[name]) == {op for path in found for op in path}
            if len(found) == 1:  # one path: its ops exactly, in execution order
                assert via[name] == next(iter(found))


def test_a_chain_of_op_diamonds_is_walked_in_linear_time():
    """conv1 -> 18 x [relu | (max_pool2d -> relu)] joined by add -> (conv2).

    Every diamond doubles the number of distinct paths (2**18), so a walk that
    follows each path separately takes seconds (and never ends at 40).  A walk
    that visits each node once per distinct set of ops passed (at most 2**3
    here) expands at most 8 states per node.
    """
    node = _layer("conv1", _input())
    for _ in range(18):
        node = _op("add", _op("relu", node), _op("relu", _op("max_pool2d", node)))
    expanded = []

    def inputs(n: Node) -> list[Node]:
        expanded.append(n)
        return n.inputs

    names, via = predecessors([node], lambda n: n.layer, inputs, lambda n: n.op)
    n_nodes = 2 + 4 * 18
    assert len(expanded) <= 8 * n_nodes
    assert names == ("conv1",)
    assert set(via["conv1"]) == {"add", "max_pool2d", "relu"}
    # The first path found is listed in full and later ones add nothing new: 2 to 3 ops per diamond.
    assert 2 * 18 <= len(via["conv1"]) <= 3 * 18
