"""Predecessors: walk back from each layer's input over values, as the torch tracer walks its nodes.

Names of ops on the way (``via``) follow the torch tracer (``max_pool2d``,
``cat``, ``adaptive_avg_pool2d``, ``interpolate``, ...), so that a model and its
ONNX export give the same graph.  Control-flow connectors (see
:mod:`hpa.backends.onnx.scopes`) appear as ``if``, ``loop`` and ``scan``.
"""

from __future__ import annotations

import re
from typing import Any

from hpa.backends.onnx.activations import ACTIVATION_OPS, TRANSPARENT
from hpa.backends.onnx.common import Shape
from hpa.backends.onnx.layers import Entry
from hpa.backends.onnx.quantized import QUANTIZERS
from hpa.dataflow import predecessors
from hpa.graph import INPUT

# ONNX op -> the torch function name the torch tracer records; {d} = spatial dims.
_VIA_NAMES = {
    "MaxPool": "max_pool{d}d", "AveragePool": "avg_pool{d}d", "LpPool": "lp_pool{d}d",
    "GlobalAveragePool": "adaptive_avg_pool{d}d", "GlobalMaxPool": "adaptive_max_pool{d}d",
    "Concat": "cat", "Sum": "add", "Resize": "interpolate", "Upsample": "interpolate",
    "BatchNormalization": "batch_norm", "InstanceNormalization": "instance_norm",
    "LayerNormalization": "layer_norm", "GroupNormalization": "group_norm", "LRN": "local_response_norm",
    "ReduceMean": "mean", "ReduceMax": "amax", "Clip": "clamp", "MatMul": "matmul",
    "Conv": "conv{d}d", "ConvTranspose": "conv_transpose{d}d", "Gemm": "linear",
}


class Predecessors:
    """Mixin of the builder: ``_predecessors(entries)`` sets every layer's predecessors and via."""

    def _predecessors(self, entries: list[Entry]) -> None:
        """Walk back from each layer's input over values, as the torch tracer walks its nodes."""
        ends = {value: entry.layer.name for entry in entries for value in entry.ends}
        graph_inputs = set(self.flat.data_inputs)

        def skip_transparent(value: str) -> str:
            # Identity and Dropout do nothing at inference and exporters drop them, and quantizers only
            # round: not listed in via (a quantizer that is a fused ReLU is labelled, and listed).
            node = self.producer.get(value)
            while node is not None and (node.op_type in TRANSPARENT or node.op_type in QUANTIZERS) \
                    and id(node) not in self.labels and value not in ends:
                value = node.input[0]
                node = self.producer.get(value)
            return value

        def endpoint(value: str) -> str | None:
            if value in ends:
                return ends[value]
            return INPUT if value in graph_inputs else None

        def inputs(value: str) -> list[str]:
            node = self.producer.get(value)
            if node is None:
                return []
            if id(node) in self.collapsed:
                return [skip_transparent(self.collapsed[id(node)])]
            return [skip_transparent(i) for i in dict.fromkeys(node.input) if i and i not in self.data_free]

        def op(value: str) -> str:
            node = self.producer[value]
            return self.labels.get(id(node)) or via_name(node, self.shapes)

        for entry in entries:
            names, via = predecessors([skip_transparent(entry.data_input)], endpoint, inputs, op, key=str)
            entry.layer.predecessors, entry.layer.via = names, via


def via_name(node: Any, shapes: dict[str, Shape]) -> str:
    op = node.op_type
    template = _VIA_NAMES.get(op)
    if template is None:
        template = ACTIVATION_OPS.get(op) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()
    if "{d}" in template:
        shape = shapes.get(node.input[0]) if node.input else None
        dims = len(shape) - 2 if shape is not None and len(shape) > 2 else 2
        template = template.format(d=dims)
    return template
