"""A graph from a TorchScript archive, read from its inlined IR.

A ScriptModule runs in C++, so the Python tracer cannot watch it; instead its
inlined graph is walked once: ``prim::GetAttr`` chains name the parameters,
``prim::Constant`` values give strides and paddings, and every other node is
an op.  The dataflow post-processing (BN folding, activations, predecessors)
is the tracer's own, and so are the op spellings (aten names are torch's).
Each layer's ``params`` names the attribute paths of its tensors, which are
the archive's state_dict keys.  Shapes are not recorded (the IR does not keep
them).

Control flow is read as the ONNX reader reads it (:mod:`hpa.backends.onnx.scopes`):

* an ``if`` whose condition the archive fixes (a constant, a module attribute
  such as ``padding_mode``, a comparison of those) is read as the branch that runs;
* any other ``prim::If`` (``if sr == 16000:``) has both blocks read, and a
  ``prim::Loop`` its body, each in its own scope: ``If_0/then_branch``,
  ``If_0/else_branch``, ``Loop_0/body`` (``If_k`` is the k-th ``if`` holding a
  layer in its scope, nested paths joined with ``/``).  Layers in a scope are
  named ``SCOPE/attribute.path`` and record ``branch``; alternative copies of a
  network are therefore all analysed.  The outputs of an ``if`` come from every
  block (an ``if`` op in ``via``), a loop's body reads the loop's inputs and
  its results are the loop's outputs (a ``loop`` op).

Quantized modules (``torch.ao.nn.quantized``) call ``quantized::conv2d`` and
the like on packed parameters; their weights are unpacked and dequantized, and
the layer records ``quantization``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from hpa.backends.torch_trace import Node, finish_layers, make_layer
from hpa.errors import LoadError
from hpa.graph import ConvGraph, Skipped, unique_name

_CONV = {"aten::conv1d": "conv1d", "aten::conv2d": "conv2d", "aten::conv3d": "conv3d",
         "aten::conv_transpose1d": "conv_transpose1d", "aten::conv_transpose2d": "conv_transpose2d",
         "aten::conv_transpose3d": "conv_transpose3d", "aten::linear": "linear"}
# torch.ao quantized ops on packed parameters -> (layer kind, the activation fused into the op).
_QUANTIZED = {
    "quantized::conv1d": ("conv1d", None), "quantized::conv2d": ("conv2d", None),
    "quantized::conv3d": ("conv3d", None), "quantized::conv1d_relu": ("conv1d", "relu"),
    "quantized::conv2d_relu": ("conv2d", "relu"), "quantized::conv3d_relu": ("conv3d", "relu"),
    "quantized::linear": ("linear", None), "quantized::linear_relu": ("linear", "relu"),
    "quantized::linear_dynamic": ("linear", None),
}
# Calls with weights that are not affine layers of their input, listed under skipped.
_RECURRENT = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu")
_LOOKUPS = ("aten::embedding", "aten::embedding_bag")
# Ops that only change how a tensor is stored: the data passes on (the quantization is the layers').
_STORAGE_OPS = ("aten::quantize_per_tensor", "aten::quantize_per_channel", "aten::dequantize")
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
# Comparisons and tests that an ``if`` condition is made of; evaluated when the archive fixes their inputs.
_FOLDABLE = {"aten::eq": operator.eq, "aten::ne": operator.ne, "aten::lt": operator.lt, "aten::le": operator.le,
             "aten::gt": operator.gt, "aten::ge": operator.ge, "aten::__not__": operator.not_,
             "aten::__is__": operator.is_, "aten::__isnot__": operator.is_not, "aten::__and__": operator.and_,
             "aten::__or__": operator.or_, "aten::len": len}
_PLAIN_TYPES = (bool, int, float, str, type(None))
# Branch names as ONNX spells them, so a scripted module and its ONNX export name their branches alike.
_IF_BLOCKS = ("then_branch", "else_branch")


def graph_from_torchscript(module: torch.jit.ScriptModule, fold_bn: bool, source: dict[str, Any]) -> ConvGraph:
    graph = module.inlined_graph
    reader = _Reader(module)
    inputs = list(graph.inputs())
    reader.values[inputs[0]] = _Submodule("")
    root = Node(0, "input", [])
    reader.nodes.append(root)
    for value in inputs[1:]:
        reader.data[value] = root
    reader.block(graph.nodes(), None)
    layers = finish_layers(reader.nodes, fold_bn)
    source = dict(source, connectivity="from the TorchScript IR", shapes="unknown (TorchScript)")
    if reader.branches:
        source["branches"] = list(reader.branches)
    # No layer at all is reported by the caller from ``skipped`` (hpa.api), like every loader's.
    return ConvGraph(layers, source=source, skipped=reader.skipped)


class _Reader:
    """One walk over the inlined IR: IR values -> constants, module paths, tensors and dataflow nodes."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self.values: dict[Any, Any] = {}  # IR value -> constant / (path, tensor) / _Submodule / object
        self.data: dict[Any, Node] = {}  # IR value -> dataflow node
        self.nodes: list[Node] = []
        self.used: dict[str, int] = {}  # layer name -> times seen, for unique names
        self.elements: dict[Any, list] = {}  # IR tuple value -> the IR values it was built from
        self.branches: list[str] = []  # every scope opened for control flow that holds a layer, in order
        self.skipped: list[Skipped] = []

    def block(self, ir_nodes, scope: str | None) -> None:
        counters: dict[str, int] = {}  # "If" / "Loop" -> scopes opened so far in this block
        for ir_node in ir_nodes:
            self.visit(ir_node, scope, counters)

    def visit(self, ir_node, scope: str | None, counters: dict[str, int]) -> None:
        kind = ir_node.kind()
        outputs = list(ir_node.outputs())
        ins = list(ir_node.inputs())
        if kind == "prim::Constant":
            self.values[outputs[0]] = outputs[0].toIValue() if outputs[0].type().kind() != "FunctionType" else None
        elif kind == "prim::GetAttr":
            self._get_attr(ir_node, ins, outputs)
        elif kind == "prim::ListConstruct" and all(i in self.values for i in ins):
            self.values[outputs[0]] = [_plain(self.values[i]) for i in ins]
        elif kind in _FOLDABLE:
            self._fold(kind, ins, outputs)
        elif kind == "prim::If" and isinstance(self.values.get(ins[0]), bool):
            self._taken_branch(ir_node, self.values[ins[0]], scope, counters)
        elif kind == "prim::If":
            self._if(ir_node, scope, counters)
        elif kind == "prim::Loop":
            self._loop(ir_node, scope, counters)
        elif kind in _STORAGE_OPS and ins and ins[0] in self.data:
            self.data[outputs[0]] = self.data[ins[0]]
        elif kind == "prim::TupleConstruct":
            self.elements[outputs[0]] = ins
        elif kind in ("prim::TupleUnpack", "prim::TupleIndex"):
            self._unpack(kind, ins, outputs)
        else:
            self._op(kind, ins, outputs, scope)

    # -- values ------------------------------------------------------------------------------------

    def _get_attr(self, ir_node, ins, outputs) -> None:
        parent = self.values.get(ins[0])
        if not isinstance(parent, _Submodule):
            return
        path = f"{parent.path}.{ir_node.s('name')}".lstrip(".")
        target = _attribute(self.module, path)
        if isinstance(target, torch.nn.Module) or type(target).__name__ == "RecursiveScriptModule":
            self.values[outputs[0]] = _Submodule(path)
        elif isinstance(target, torch.Tensor):
            self.values[outputs[0]] = (path, target)
        else:
            self.values[outputs[0]] = target

    def _fold(self, kind: str, ins, outputs) -> None:
        """A comparison of values the archive fixes (``self.padding_mode != "zeros"``): its result."""
        args = [self.values.get(i, _UNKNOWN) for i in ins]
        if all(_is_plain(a) for a in args):
            try:
                self.values[outputs[0]] = _FOLDABLE[kind](*args)
            except TypeError:  # a comparison Python refuses: leave the condition unknown
                pass

    def _unpack(self, kind: str, ins, outputs) -> None:
        """Tuple elements carry the data of what they were built from (``out, _ = self.rnn(x)``)."""
        elements = self.elements.get(ins[0])
        if kind == "prim::TupleIndex":
            index = self.values.get(ins[1])
            pairs = [(outputs[0], elements[index] if elements and isinstance(index, int) else ins[0])]
        else:
            pairs = [(out, elements[k] if elements else ins[0]) for k, out in enumerate(outputs)]
        for out, source in pairs:
            if source in self.data:
                self.data[out] = self.data[source]
            if source in self.values:
                self.values[out] = self.values[source]

    # -- control flow ------------------------------------------------------------------------------

    def _taken_branch(self, ir_node, condition: bool, scope, counters) -> None:
        """An ``if`` on a constant or a module flag (``F.relu``'s ``inplace``, ``self.training``): the
        branch that runs is read like straight-line code, and the ``if``'s outputs are its results."""
        block = list(ir_node.blocks())[0 if condition else 1]
        for inner in block.nodes():
            self.visit(inner, scope, counters)
        for out, result in zip(ir_node.outputs(), block.returnNode().inputs()):
            if result in self.data:
                self.data[out] = self.data[result]
            if result in self.values:
                self.values[out] = self.values[result]

    def _if(self, ir_node, scope, counters) -> None:
        """Both blocks, each in its scope; every output comes from the matching result of each block."""
        blocks = list(ir_node.blocks())
        path = self._open_scope(ir_node, "If", scope, counters)
        scopes = [path if path == scope else f"{path}/{name}" for name in _IF_BLOCKS]
        if path != scope:
            self.branches.extend(scopes)
        for block, inner in zip(blocks, scopes):
            self.block(block.nodes(), inner)
        for k, out in enumerate(ir_node.outputs()):
            sources = [self.data[r] for r in (list(b.returnNode().inputs())[k] for b in blocks) if r in self.data]
            if sources:
                self.data[out] = self._connector("if", sources)

    def _loop(self, ir_node, scope, counters) -> None:
        """The body, once, in its scope: it reads the loop's carried inputs, its results are the outputs."""
        body = next(iter(ir_node.blocks()))
        path = self._open_scope(ir_node, "Loop", scope, counters)
        inner = path if path == scope else f"{path}/body"
        if path != scope:
            self.branches.append(inner)
        carried = list(ir_node.inputs())[2:]  # (max trip count, condition, carried values...)
        for outer, value in zip(carried, list(body.inputs())[1:]):  # body: (iteration, carried values...)
            if outer in self.data:
                self.data[value] = self._connector("loop", [self.data[outer]])
        self.block(body.nodes(), inner)
        results = list(body.returnNode().inputs())[1:]  # the body returns its condition first
        for out, result in zip(ir_node.outputs(), results):
            if result in self.data:
                self.data[out] = self._connector("loop", [self.data[result]])

    def _open_scope(self, ir_node, op: str, scope: str | None, counters: dict[str, int]) -> str | None:
        """``scope/If_k`` for the k-th such node holding a layer here; ``scope`` itself for one holding none,
        so that shape checks and ``raise`` blocks neither open scopes nor shift the numbers."""
        if not _holds_layer(ir_node):
            return scope
        label = f"{op}_{counters.get(op, 0)}"
        counters[op] = counters.get(op, 0) + 1
        return f"{scope}/{label}" if scope else label

    def _connector(self, op: str, sources: list[Node]) -> Node:
        node = Node(len(self.nodes), op, list(dict.fromkeys(sources)))
        self.nodes.append(node)
        return node

    # -- ops and layers ------------------------------------------------------------------------------

    def _op(self, kind: str, ins, outputs, scope: str | None) -> None:
        sources = [self.data[i] for i in ins if i in self.data]
        if not sources or not any(_is_tensor(out) for out in outputs):
            return
        op = kind.split("::")[-1].rstrip("_")
        self._note_not_analysed(kind, ins, scope)
        layer_kind = _CONV.get(kind) or _convolution_kind(kind, ins, self.values)
        if kind in _QUANTIZED:
            node = self._quantized_layer(kind, ins, scope)
        elif layer_kind:
            node = self._layer(layer_kind, kind, ins, scope)
        elif op in _PAD_ARGS:
            node = Node(len(self.nodes), "pad", list(dict.fromkeys(sources)), args=_pad_args(op, ins, self.values))
        else:
            names = _ARGS.get(op, ())
            args = {n: _plain(self.values.get(v)) for n, v in zip(names, ins) if n != "input"}
            node = Node(len(self.nodes), op, list(dict.fromkeys(sources)), args=args,
                        names=_state_keys(names, ins, self.values))
        self.nodes.append(node)
        for out in outputs:
            self.data[out] = node

    def _note_not_analysed(self, kind: str, ins, scope: str | None) -> None:
        if kind not in _RECURRENT and kind not in _LOOKUPS:
            return
        keys = [self.values[v][0] for v in ins if isinstance(self.values.get(v), tuple)]
        name = self._name(keys[0].rsplit(".", 1)[0] if keys else f"{kind.split('::')[1]}_{len(self.nodes)}", scope)
        if kind in _RECURRENT:
            self.skipped.append(Skipped(name, f"{kind}: recurrent layer, not analysed"))
        else:
            self.skipped.append(Skipped(name, f"{kind}: a lookup table, not a linear layer of its input; "
                                              "not analysed"))

    def _layer(self, layer_kind, kind, ins, scope) -> Node:
        names = _ARGS["_convolution" if kind == "aten::_convolution" else
                      "linear" if layer_kind == "linear" else
                      "conv_transpose" if "transpose" in layer_kind else "conv"]
        bound = {n: _plain(self.values.get(v)) for n, v in zip(names, ins)}
        keys = _state_keys(names, ins, self.values)
        name = keys["weight"].rsplit(".", 1)[0] if "weight" in keys else f"{layer_kind}_{len(self.nodes)}"
        bound = {k: v for k, v in bound.items() if v is not None or k == "bias"}
        # A weight or bias computed in the forward pass cannot be re-read from the state.
        computed = "weight" not in keys or (bound.get("bias") is not None and "bias" not in keys)
        params = {} if computed else {role: keys[role] for role in ("weight", "bias") if role in keys}
        layer = make_layer(layer_kind, self._name(name, scope), bound, None, None, params)
        layer.branch = scope
        source = self.data.get(ins[0])
        return Node(len(self.nodes), "layer", [source] if source else [], layer=layer)

    def _quantized_layer(self, kind: str, ins, scope) -> Node:
        """A ``quantized::`` call: its packed weights unpacked and dequantized; a fused ReLU becomes the
        relu op that follows the layer, as in the float model.  Its weights are not state_dict tensors."""
        layer_kind, fused = _QUANTIZED[kind]
        packed = self.values.get(ins[1])
        path = self._packed_path(ins[1])
        name = path.removesuffix("._packed_params._packed_params").removesuffix("._packed_params")
        bound = _unpacked(kind, layer_kind, packed, name)
        layer = make_layer(layer_kind, self._name(name, scope), bound, None, None, {})
        layer.branch = scope
        layer.quantization = _torch_quantization(kind, bound["quantized_weight"])
        source = self.data.get(ins[0])
        node = Node(len(self.nodes), "layer", [source] if source else [], layer=layer)
        if fused is None:
            return node
        self.nodes.append(node)
        return Node(len(self.nodes), fused, [node])

    def _packed_path(self, value) -> str:
        """The attribute path of a packed-parameters object (``conv._packed_params``)."""
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return f"quantized_{len(self.nodes)}"
        parent = self.values.get(next(iter(node.inputs())))
        prefix = parent.path if isinstance(parent, _Submodule) else ""
        return f"{prefix}.{node.s('name')}".lstrip(".")

    def _name(self, name: str, scope: str | None) -> str:
        return unique_name(f"{scope}/{name}" if scope else name, self.used)


@dataclass(frozen=True)
class _Submodule:
    """An IR value that is a (sub)module of the archive, by its attribute path ("" for the root)."""

    path: str


_UNKNOWN = object()


def _is_plain(value) -> bool:
    """Python scalars, strings, None and lists of them: values a condition may be computed from."""
    if isinstance(value, list):
        return all(isinstance(v, _PLAIN_TYPES) for v in value)
    return isinstance(value, _PLAIN_TYPES)


def _holds_layer(ir_node) -> bool:
    """Whether a control-flow node calls a conv, linear or quantized layer anywhere inside."""
    for block in ir_node.blocks():
        for inner in block.nodes():
            kind = inner.kind()
            if kind in _CONV or kind in _QUANTIZED or kind == "aten::_convolution" or _holds_layer(inner):
                return True
    return False


def _unpacked(kind: str, layer_kind: str, packed, name: str) -> dict[str, Any]:
    """The call's arguments in the float op's form, from torch.ao's packed parameters."""
    if packed is None or not isinstance(packed, torch.ScriptObject):
        raise LoadError(f"the TorchScript call {kind} of {name!r} has no packed parameters hpa can read; "
                        "the archive is damaged or from another torch version: save it again with torch.jit.save")
    if layer_kind == "linear":
        weight, bias = torch.ops.quantized.linear_unpack(packed)
        return {"weight": weight.dequantize(), "bias": bias, "quantized_weight": weight}
    weight, bias = packed.unpack()
    args = {"stride": packed.stride(), "padding": packed.padding(), "dilation": packed.dilation(),
            "groups": packed.groups()}
    real = weight.dequantize()
    if layer_kind == "conv1d":  # torch.ao runs a conv1d as a conv2d of height 1
        real = real.squeeze(2)
        args = {k: (v[1:] if isinstance(v, list) else v) for k, v in args.items()}
    return {"weight": real, "bias": bias, "quantized_weight": weight, **args}


def _torch_quantization(kind: str, weight: torch.Tensor) -> dict[str, Any]:
    per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                       torch.per_channel_affine_float_qparams)
    return {"format": kind, "dtype": str(weight.dtype).removeprefix("torch."), "per_channel": per_channel}


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
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LoadError(f"the TorchScript code reads the attribute {path!r}, which the archive does not "
                            "hold; the archive is damaged or was edited: save the model again with "
                            "torch.jit.save") from None
    return target
