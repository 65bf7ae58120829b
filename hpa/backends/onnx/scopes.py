"""One flat namespace for a model's main graph, its control-flow subgraphs and its local functions.

Exporters put convs inside ``If`` branches (one network per sample rate, say)
and ``Loop``/``Scan`` bodies, and opset-18 exporters put them inside local
functions.  The rest of the reader works on one list of nodes, so:

* local functions are inlined first, with the onnx package's own inliner, so a
  conv in a function body sees the call's inputs (its weights) by name;
* every subgraph's nodes are spliced in at the position of the node that owns
  it.  Values defined inside a subgraph (its initializers, inputs and node
  outputs) are renamed ``PATH/name``, where the branch path ``PATH`` is
  ``If_0/then_branch`` (owner node name, or op and index, then the attribute),
  so that two branches may reuse a name.  A name a subgraph does not define
  refers to the enclosing scope, as in ONNX itself, and is left as that scope
  spells it.  Outer initializers and ``Constant`` nodes in the branch therefore
  resolve like any other constant.
* the owner node itself is replaced by connector nodes of the same op type that
  carry data across the scope boundary: the outputs of an ``If`` come from the
  matching output of every branch, a ``Loop``/``Scan`` body's inputs come from
  the node's inputs and its outputs go on to the node's outputs.  The
  predecessor walk therefore passes into a branch and out of it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from hpa.backends.onnx.common import Shape
from hpa.errors import LoadError
from hpa.graph import unique_name

_GRAPH_ATTRIBUTE = 5  # AttributeProto.GRAPH
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass(eq=False)
class FlatGraph:
    """The main graph with its subgraphs spliced in; see the module docstring."""

    nodes: list[Any] = field(default_factory=list)  # NodeProtos in execution order
    initializers: dict[str, Any] = field(default_factory=dict)  # scoped name -> TensorProto
    data_inputs: list[str] = field(default_factory=list)  # the main graph's non-initializer inputs
    outputs: set[str] = field(default_factory=set)  # the main graph's outputs
    branch: dict[int, str] = field(default_factory=dict)  # id(node) -> branch path, for nodes in a subgraph
    top_level: dict[int, int] = field(default_factory=dict)  # id(node) -> index in the main graph
    branches: list[str] = field(default_factory=list)  # every branch path, in order


def inline_functions(model: Any) -> Any:
    """``model`` with its local functions inlined (the model itself when it has none)."""
    if not len(model.functions):
        return model
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # noqa: BLE001 - the inliner raises untyped errors on malformed functions
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"the local functions of the model cannot be inlined ({first}); the file is damaged "
                        "or uses functions this onnx version cannot read: re-export it") from None


def flatten(graph: Any) -> FlatGraph:
    """The nodes of ``graph`` and of every subgraph in it, in one namespace."""
    flat = FlatGraph()
    flat.initializers = {t.name: t for t in graph.initializer}
    flat.data_inputs = [v.name for v in graph.input if v.name not in flat.initializers]
    flat.outputs = {v.name for v in graph.output}
    _splice(graph, "", {}, flat)
    return flat


def scoped_value_infos(graph: Any) -> Iterator[tuple[str, Any]]:
    """(scoped name, ValueInfoProto) of every value shape inference described in any scope."""
    yield from _value_infos(graph, "", {})


def shape_of(value: Any) -> Shape | None:
    """A ValueInfoProto's shape, None for unknown dimensions; None when it has no shape."""
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


# -- naming -------------------------------------------------------------------------------------

def _names(graph: Any, path: str, outer: dict[str, str]) -> dict[str, str]:
    """Name -> scoped name for every value visible in ``graph`` (its own and the enclosing ones)."""
    if not path:
        return {}
    names = dict(outer)
    local = [t.name for t in graph.initializer] + [v.name for v in graph.input]
    local += [o for node in graph.node for o in node.output if o]
    names.update({name: f"{path}/{name}" for name in local})
    return names


def _owners(graph: Any, path: str) -> dict[int, str]:
    """Node index -> scope path of each node in ``graph`` that owns subgraphs ("If_0", "Loop_3/body/If_1").

    A node is labelled by its name (without the exporter's leading "/"), else by op type
    and index; a repeated label gets "#2", so that two owners never share a scope.
    """
    used: dict[str, int] = {}
    owners = {}
    for index, node in enumerate(graph.node):
        if any(a.type == _GRAPH_ATTRIBUTE for a in node.attribute):
            label = unique_name(node.name.strip("/") or f"{node.op_type}_{index}", used)
            owners[index] = f"{path}/{label}" if path else label
    return owners


def _subgraphs(node: Any, owner: str | None) -> list[tuple[str, Any]]:
    """(branch path, subgraph) for each graph attribute of ``node``, then_branch first."""
    if owner is None:
        return []
    graphs = [(a.name, a.g) for a in node.attribute if a.type == _GRAPH_ATTRIBUTE]
    graphs.sort(key=lambda pair: pair[0] != "then_branch")  # then before else, whatever the stored order
    return [(f"{owner}/{name}", g) for name, g in graphs]


def _rename(name: str, names: dict[str, str]) -> str:
    return names.get(name, name) if name else name


# -- splicing -------------------------------------------------------------------------------------

def _splice(graph: Any, path: str, outer: dict[str, str], flat: FlatGraph) -> None:
    names = _names(graph, path, outer)
    if path:
        flat.branches.append(path)
        for tensor in graph.initializer:
            flat.initializers[names[tensor.name]] = tensor
    owners = _owners(graph, path)
    for index, node in enumerate(graph.node):
        subgraphs = _subgraphs(node, owners.get(index))
        if not subgraphs:
            _add(flat, _renamed_node(node, names) if path else node, path, None if path else index)
            continue
        scopes = [_names(subgraph, sub_path, names) for sub_path, subgraph in subgraphs]
        for (sub_path, subgraph), sub_names in zip(subgraphs, scopes):
            for source, target in _body_inputs(node, subgraph):
                _add(flat, _connector(node, [_rename(source, names)], sub_names[target]), path, None)
            _splice(subgraph, sub_path, names, flat)
        for k, output in enumerate(node.output):
            sources = [_rename(_body_output(node, subgraph, k), sub_names)
                       for (_, subgraph), sub_names in zip(subgraphs, scopes)]
            if output and all(sources):
                _add(flat, _connector(node, sources, _rename(output, names)), path, None)


def _add(flat: FlatGraph, node: Any, path: str, top_index: int | None) -> None:
    flat.nodes.append(node)
    if path:
        flat.branch[id(node)] = path
    if top_index is not None:
        flat.top_level[id(node)] = top_index


def _renamed_node(node: Any, names: dict[str, str]) -> Any:
    copy = type(node)()
    copy.CopyFrom(node)
    copy.ClearField("input")
    copy.ClearField("output")
    copy.input.extend(_rename(i, names) for i in node.input)
    copy.output.extend(_rename(o, names) for o in node.output)
    return copy


def _connector(owner: Any, inputs: list[str], output: str) -> Any:
    """A node of the owner's op type that only passes data across the scope boundary."""
    from onnx import helper

    return helper.make_node(owner.op_type, inputs, [output], name=owner.name, domain=owner.domain)


def _body_inputs(node: Any, subgraph: Any) -> list[tuple[str, str]]:
    """(outer value, body input) pairs: Loop's carried values, Scan's states and sequences."""
    body = [v.name for v in subgraph.input]
    if node.op_type == "Loop":  # inputs (M, cond, v...) -> body (iteration, cond, v...)
        return [(node.input[k], body[k]) for k in range(2, min(len(node.input), len(body))) if node.input[k]]
    if node.op_type == "Scan":
        return [(node.input[k], body[k]) for k in range(min(len(node.input), len(body))) if node.input[k]]
    return []


def _body_output(node: Any, subgraph: Any, k: int) -> str:
    """The subgraph output that becomes output ``k`` of its owner ("" when there is none)."""
    body = [v.name for v in subgraph.output]
    position = k + 1 if node.op_type == "Loop" else k  # a Loop body returns its condition first
    return body[position] if position < len(body) else ""


# -- shapes ------------------------------------------------------------------------------------------

def _value_infos(graph: Any, path: str, outer: dict[str, str]) -> Iterator[tuple[str, Any]]:
    names = _names(graph, path, outer)
    for value in (*graph.input, *graph.value_info, *graph.output):
        yield _rename(value.name, names), value
    owners = _owners(graph, path)
    for index, node in enumerate(graph.node):
        for sub_path, subgraph in _subgraphs(node, owners.get(index)):
            yield from _value_infos(subgraph, sub_path, names)
