"""A graph from a TorchScript archive, read from its inlined IR.

A ScriptModule runs in C++, so the Python tracer cannot watch it; instead its
inlined graph is walked once: ``prim::GetAttr`` chains name the parameters,
``prim::Constant`` values give strides and paddings, and every other node is
an op.  The dataflow post-processing (BN folding, activations, predecessors)
is the tracer's own, and so are the op spellings (aten names are torch's).
Each layer's ``params`` names the attribute paths of its tensors, which are
the archive's state_dict keys.  Shapes are not recorded (the IR does not keep
them).
"""

from __future__ import annotations

from typing import Any

import torch

from hpa.errors import UnsupportedModelError
from hpa.graph import ConvGraph, unique_name
from hpa.backends.torch_trace import Node, finish_layers, make_layer

_CONV = {"aten::conv1d": "conv1d", "aten::conv2d": "conv2d", "aten::conv3d": "conv3d",
         "aten::conv_transpose1d": "conv_transpose1d", "aten::conv_transpose2d": "conv_transpose2d",
         "aten::conv_transpose3d": "conv_transpose3d", "aten::linear": "linear"}
_ARGS = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "linear": ("input", "weight", "bias"),
    "_convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups"),
    "batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    "leaky_relu": ("input", "negative_slope"),
    "hardtanh": ("input", "min_val", "max_val"),
    "clamp": ("input", "min", "max"),
}
# Pad ops: op -> positional args (constant_pad_nd has no mode; it is always "constant").
_PAD_ARGS = {"pad": ("input", "pad", "mode", "value"), "constant_pad_nd": ("input", "pad", "value")}


def graph_from_torchscript(module: torch.jit.ScriptModule, fold_bn: bool, source: dict[str, Any]) -> ConvGraph:
    graph = module.inlined_graph
    values: dict[Any, Any] = {}  # IR value -> constant / tensor / ("module", path)
    data: dict[Any, Node] = {}  # IR value -> dataflow node
    nodes: list[Node] = []
    inputs = list(graph.inputs())
    values[inputs[0]] = ("module", "")
    root = Node(0, "input", [])
    nodes.append(root)
    for value in inputs[1:]:
        data[value] = root
    used: dict[str, int] = {}  # layer name -> times seen, for unique names
    for ir_node in graph.nodes():
        _visit(ir_node, module, values, data, nodes, used)
    layers = finish_layers(nodes, fold_bn)
    if not layers:
        raise UnsupportedModelError("the TorchScript model has no conv or linear calls; hpa analyses conv networks")
    source = dict(source, connectivity="from the TorchScript IR", shapes="unknown (TorchScript)")
    return ConvGraph(layers, source=source)


def _visit(ir_node, module, values, data, nodes, used) -> None:
    kind = ir_node.kind()
    outputs = list(ir_node.outputs())
    ins = list(ir_node.inputs())
    if kind == "prim::Constant":
        values[outputs[0]] = outputs[0].toIValue() if outputs[0].type().kind() != "FunctionType" else None
        return
    if kind == "prim::GetAttr":
        parent = values.get(ins[0])
        if isinstance(parent, tuple) and parent[0] == "module":
            path = f"{parent[1]}.{ir_node.s('name')}".lstrip(".")
            target = _attribute(module, path)
            if isinstance(target, torch.nn.Module) or type(target).__name__ == "RecursiveScriptModule":
                values[outputs[0]] = ("module", path)
            elif isinstance(target, torch.Tensor):
                values[outputs[0]] = (path, target)
            else:
                values[outputs[0]] = target
        return
    if kind == "prim::ListConstruct" and all(i in values for i in ins):
        values[outputs[0]] = [_plain(values[i]) for i in ins]
        return
    if kind == "prim::If" and isinstance(values.get(ins[0]), bool):
        _visit_taken_branch(ir_node, values[ins[0]], module, values, data, nodes, used)
        return
    sources = [data[i] for i in ins if i in data]
    if not sources or not any(_is_tensor(out) for out in outputs):
        return
    op = kind.split("::")[-1].rstrip("_")
    layer_kind = _CONV.get(kind) or _convolution_kind(kind, ins, values)
    if layer_kind:
        node = _layer(layer_kind, kind, ins, values, data, len(nodes), used)
    elif op in _PAD_ARGS:
        node = Node(len(nodes), "pad", list(dict.fromkeys(sources)), args=_pad_args(op, ins, values))
    else:
        names = _ARGS.get(op, ())
        args = {n: _plain(values.get(v)) for n, v in zip(names, ins) if n != "input"}
        node = Node(len(nodes), op, list(dict.fromkeys(sources)), args=args,
                    names=_state_keys(names, ins, values))
    nodes.append(node)
    for out in outputs:
        data[out] = node


def _visit_taken_branch(ir_node, condition: bool, module, values, data, nodes, used) -> None:
    """An ``if`` on a constant or a module flag (``F.relu``'s ``inplace``, ``self.training``): the
    branch that runs is read like straight-line code, and the ``if``'s outputs are its results."""
    block = list(ir_node.blocks())[0 if condition else 1]
    for inner in block.nodes():
        _visit(inner, module, values, data, nodes, used)
    for out, result in zip(ir_node.outputs(), block.returnNode().inputs()):
        if result in data:
            data[out] = data[result]
        if result in values:
            values[out] = values[result]


def _layer(layer_kind, kind, ins, values, data, index, used) -> Node:
    names = _ARGS["_convolution" if kind == "aten::_convolution" else
                  "linear" if layer_kind == "linear" else
                  "conv_transpose" if "transpose" in layer_kind else "conv"]
    bound = {n: _plain(values.get(v)) for n, v in zip(names, ins)}
    keys = _state_keys(names, ins, values)
    name = keys["weight"].rsplit(".", 1)[0] if "weight" in keys else f"{layer_kind}_{index}"
    bound = {k: v for k, v in bound.items() if v is not None or k == "bias"}
    # A weight or bias computed in the forward pass cannot be re-read from the state.
    computed = "weight" not in keys or (bound.get("bias") is not None and "bias" not in keys)
    params = {} if computed else {role: keys[role] for role in ("weight", "bias") if role in keys}
    layer = make_layer(layer_kind, unique_name(name, used), bound, None, None, params)
    source = data.get(ins[0])
    return Node(index, "layer", [source] if source else [], layer=layer)


def _pad_args(op: str, ins, values) -> dict[str, Any]:
    """A pad node's args in the tracer's form, so that the shared post-processing merges a
    constant-zero pad into the conv it feeds; a pad it cannot merge stays an op in ``via``.

    ``aten::pad`` is what scripted ``F.pad``/``ZeroPad2d`` call, ``aten::constant_pad_nd`` what a
    traced archive holds.  A pad list computed at run time gives no args: never merged.
    """
    bound = {n: _plain(values.get(v)) for n, v in zip(_PAD_ARGS[op], ins)}
    pad = bound.get("pad")
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        return {}
    value = bound.get("value")
    # The IR has no shapes, so the conv's input shape stays unknown, as for every TorchScript layer.
    return {"pad": tuple(pad), "mode": bound.get("mode", "constant"),
            "value": 0.0 if value is None else value, "input_shape": None}


def _convolution_kind(kind, ins, values) -> str | None:
    if kind != "aten::_convolution":
        return None
    weight = _plain(values.get(ins[1]))
    dims = weight.dim() - 2 if isinstance(weight, torch.Tensor) else 2
    return f"conv_transpose{dims}d" if _plain(values.get(ins[6])) else f"conv{dims}d"


def _state_keys(names, ins, values) -> dict[str, str]:
    """arg -> attribute path, for the args that are tensors read straight off the module."""
    keys = {}
    for arg, value in zip(names, ins):
        entry = values.get(value)
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
            keys[arg] = entry[0]
    return keys


def _is_tensor(value) -> bool:
    kind = value.type().kind()
    return kind == "TensorType" or (kind == "ListType" and value.type().getElementType().kind() == "TensorType")


def _plain(entry):
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
        return entry[1]
    return entry


def _attribute(module, path: str):
    target = module
    for part in path.split("."):
        target = getattr(target, part)
    return target
