"""Turn an ONNX model into a :class:`~hpa.graph.ConvGraph`: the entry point of the ONNX reader.

The steps, each in its own module of this package:

1. :mod:`~hpa.backends.onnx.file` reads the file (large tensors stay in the memory-mapped file);
2. :mod:`~hpa.backends.onnx.scopes` inlines local functions and splices control-flow
   subgraphs (``If``/``Loop``/``Scan``) into one flat list of nodes;
3. :mod:`~hpa.backends.onnx.shapes` runs ONNX shape inference;
4. the :class:`Builder` walks the nodes: :mod:`~hpa.backends.onnx.layers` recognises
   layers (:mod:`~hpa.backends.onnx.quantized` the quantized ones), :mod:`~hpa.backends.onnx.folding` folds BatchNorm and affines into them,
   :mod:`~hpa.backends.onnx.activations` finds the nonlinearity after each, and
   :mod:`~hpa.backends.onnx.predecessors` connects them; every constant comes from
   :mod:`~hpa.backends.onnx.constants`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hpa.backends.onnx.activations import Activations
from hpa.backends.onnx.common import DEFAULT_DOMAINS, Shape, node_name
from hpa.backends.onnx.constants import Constants
from hpa.backends.onnx.file import OnnxFile, read_onnx
from hpa.backends.onnx.folding import Folding
from hpa.backends.onnx.layers import WEIGHTED_UNSUPPORTED, Entry, Layers
from hpa.backends.onnx.predecessors import Predecessors
from hpa.backends.onnx.quantized import Quantized
from hpa.backends.onnx.scopes import CONTROL_FLOW, FlatGraph, flatten, inline_functions
from hpa.backends.onnx.shapes import infer_shapes
from hpa.errors import OptionError
from hpa.graph import ConvGraph, Layer, Skipped
from hpa.options import LoadOptions


def load_onnx(path: str, options: LoadOptions) -> ConvGraph:
    """Read ``path`` and build its normalized graph."""
    if not options.default_weights and options.weights != "":
        raise OptionError("an ONNX file holds its own weights; --weights does not apply to the onnx loader "
                          "(use --init PATH to compare against another file)")
    onnx_file = read_onnx(path)
    onnx_file.model = inline_functions(onnx_file.model)
    model = onnx_file.model
    flat = flatten(model.graph)
    # Fold shape arguments computed by constant subgraphs (a Pad's pads, a Reshape's shape) first,
    # so that shape inference can see through them.
    folded = Builder(onnx_file, flat, {}, options).shape_arguments()
    shapes, input_shape, notes = infer_shapes(model, options.input_size, str(onnx_file.path), folded)
    builder = Builder(onnx_file, flat, shapes, options)
    layers = builder.build()
    # No conv layer: hpa.api says what was found instead, and that the branches were searched.
    static_input = None if input_shape is None or None in input_shape else tuple(input_shape)
    return ConvGraph(layers, source=_source(onnx_file, builder, static_input, notes, flat), skipped=builder.skipped,
                     input_shape=static_input)


def _source(onnx_file: OnnxFile, builder: Builder, input_shape, notes: list[str], flat: FlatGraph) -> dict:
    model = onnx_file.model
    source: dict[str, Any] = {
        "file": str(onnx_file.path),
        "format": "onnx",
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": int(model.ir_version),
        "opset": builder.opset,
    }
    if flat.branches:
        source["branches"] = list(flat.branches)
    if onnx_file.external_files:
        source["external_data"] = sorted(onnx_file.external_files)
    if notes:
        source["notes"] = notes
    return source


class Builder(Constants, Layers, Quantized, Folding, Activations, Predecessors):
    """One pass over the flat node list; the mixins hold the parts (see the module docstring)."""

    def __init__(self, onnx_file: OnnxFile, flat: FlatGraph, shapes: dict[str, Shape],
                 options: LoadOptions) -> None:
        self.file = onnx_file
        self.model = onnx_file.model
        self.flat = flat
        self.shapes = shapes
        self.options = options
        self.opset = next((int(o.version) for o in self.model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in flat.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in dict.fromkeys(i for i in node.input if i):
                self.consumers[name].append(node)
        self.data_free = self._data_free_values()
        self.cache: dict[str, Any] = {}
        self.skipped: list[Skipped] = []
        self.labels: dict[int, str] = {}  # id(node) -> via name for nodes of recognised patterns
        self.collapsed: dict[int, str] = {}  # id(last node of a multi-node activation) -> its input
        self.used_names: dict[str, int] = {}

    def build(self) -> list[Layer]:
        entries: list[Entry] = []
        consumed: set[int] = set()  # ids of nodes folded into a layer or absorbed
        for node in self.flat.nodes:
            if id(node) in consumed:
                continue
            entry = self._layer_entry(node)
            if entry is not None:
                entry.layer.index = len(entries)
                entry.layer.branch = self.flat.branch.get(id(node))
                entries.append(entry)
                consumed.update(self._finish_layer(entry))
            else:
                self._note_unknown(node)
        self._predecessors(entries)
        return [entry.layer for entry in entries]

    def _note_unknown(self, node: Any) -> None:
        import onnx

        op = node.op_type
        if node.domain in DEFAULT_DOMAINS and op in WEIGHTED_UNSUPPORTED:
            self.skipped.append(Skipped(self._scoped(node, node_name(node)), f"{op}: {WEIGHTED_UNSUPPORTED[op]}"))
            return
        if node.domain in DEFAULT_DOMAINS and op in CONTROL_FLOW:
            return  # a connector: its subgraphs' nodes are in the list themselves
        domain = node.domain or "ai.onnx"
        try:
            known = onnx.defs.has(op, node.domain)
        except Exception:  # noqa: BLE001
            known = False
        if not known:
            self.skipped.append(Skipped(self._scoped(node, node_name(node)),
                                        f"{domain}::{op}: unknown operator, not analysed "
                                        "(predecessors are traced through it)"))

    def _finish_layer(self, entry: Entry) -> set[int]:
        """Fold what follows the layer, then find its activation; returns the ids of nodes folded."""
        consumed: set[int] = set()
        if self.options.fold_bn:
            while True:
                node = self._fold_next(entry)
                if node is None:
                    break
                consumed.add(id(node))
        name, params, nodes, _ = self._activation(entry.ends[-1])
        entry.layer.activation, entry.layer.activation_params = name, params
        for node in nodes:  # the torch tracer's names: nn.ReLU6 runs F.hardtanh
            self.labels[id(node)] = {"relu6": "hardtanh"}.get(name, name)
        if len(nodes) > 1:  # x * sigmoid(x) and the like: one op on x for the predecessor walk
            self.collapsed[id(nodes[-1])] = nodes[0].input[0]
        return consumed

    def _single_consumer(self, value: str) -> Any | None:
        consumers = self.consumers.get(value, [])
        if len(consumers) != 1 or value in self.flat.outputs:
            return None
        return consumers[0]
