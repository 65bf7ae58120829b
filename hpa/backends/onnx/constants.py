"""Constant evaluation: the value of any tensor the file alone determines.

Weights reach a node by many routes: initializers (of the main graph or of a
branch), ``Constant`` nodes, ``Identity``/``Cast``/``Reshape``/``Transpose``
chains, ``DequantizeLinear``, external data, and any other constant subgraph
(``ConstantOfShape``, ``Concat`` of shapes, ...).  Common routes are folded
here without copying large weights; the rest is evaluated node by node with
``onnx.reference``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpa.backends.onnx.common import DEFAULT_DOMAINS, attributes
from hpa.backends.onnx.quantized import dequantize
from hpa.errors import LoadError

# Ops whose outputs are never constant even when their inputs are (control-flow connectors included).
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "If", "Loop", "Scan"}
# Inputs that are shapes, sizes, axes or pads rather than data.
SHAPE_ARGUMENTS = {
    "Pad": (1, 2, 3), "Reshape": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "Expand": (1,), "Tile": (1,),
    "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "ConstantOfShape": (0,), "Split": (1,),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "Range": (0, 1, 2),
    "TopK": (1,), "OneHot": (1,), "CenterCropPad": (1,), "Col2Im": (1, 2),
}


class Constants:
    """Mixin of the builder: ``const(name)`` and what it needs.

    Expects ``self.flat``, ``self.file``, ``self.model``, ``self.shapes``,
    ``self.producer`` and ``self.cache`` (see :class:`~hpa.backends.onnx.builder.Builder`).
    """

    def _data_free_values(self) -> set[str]:
        """Values that do not depend on the data of any graph input (constants and shapes)."""
        free = set(self.flat.initializers)
        for node in self.flat.nodes:
            inputs = [i for i in node.input if i]
            if node.domain not in DEFAULT_DOMAINS or node.op_type in NONDETERMINISTIC:
                continue
            if node.op_type in ("Constant", "Shape", "Size") or (inputs and all(i in free for i in inputs)):
                free.update(o for o in node.output if o)
        return free

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant the file determines, else None."""
        if not name or name not in self.data_free:
            return None
        if name not in self.cache:
            if name in self.flat.initializers:
                self.cache[name] = self.file.tensor(self.flat.initializers[name], label=name)
            else:
                self._fold(self.producer[name])
        return self.cache.get(name)

    def _fold(self, node: Any) -> None:
        outputs = list(node.output)
        try:
            values = self._evaluate(node)
        except LoadError:  # a damaged or missing tensor is the user's problem, not a non-constant
            raise
        except Exception:  # noqa: BLE001 - a subgraph onnx cannot evaluate is simply not constant
            values = None
        for k, out in enumerate(outputs):
            if out:
                self.cache[out] = None if values is None or k >= len(values) else values[k]

    def _evaluate(self, node: Any) -> list[np.ndarray] | None:
        op = node.op_type
        attrs = attributes(node)
        if op == "Constant":
            return [self._constant_attribute(node)]
        if op in ("Shape", "Size"):
            return self._shape_value(node, attrs)
        inputs = [self.const(i) if i else None for i in node.input]
        if any(i and v is None for i, v in zip(node.input, inputs)):
            return None
        fast = _FAST_FOLDS.get(op)
        if fast is not None:
            result = fast(inputs, attrs)
            if result is not None:
                return [result]
        return _reference_evaluate(node, inputs, self.model)

    def _shape_value(self, node: Any, attrs: dict[str, Any]) -> list[np.ndarray] | None:
        shape = self.shapes.get(node.input[0])
        if shape is None or None in shape:
            value = self.const(node.input[0])
            if value is None:
                return None
            shape = value.shape
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
        start, end = attrs.get("start", 0), attrs.get("end")
        return [np.array(shape[start:end], dtype=np.int64)]

    def _constant_attribute(self, node: Any) -> np.ndarray | None:
        from onnx import helper

        for attr in node.attribute:
            if attr.name == "value":
                return self.file.tensor(attr.t, label=node.output[0])
            if attr.name in ("value_float", "value_floats"):
                return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
            if attr.name in ("value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
        return None  # sparse or string constants: not weights

    def shape_arguments(self) -> dict[tuple[int, int], np.ndarray]:
        """Small constants computed by subgraphs that feed shape arguments of main-graph nodes.

        Returns (main-graph node index, input index) -> value, for :func:`~hpa.backends.onnx.shapes.infer_shapes`.
        """
        found = {}
        for node in self.flat.nodes:
            k = self.flat.top_level.get(id(node))
            if k is None or node.domain not in DEFAULT_DOMAINS:
                continue
            for j in SHAPE_ARGUMENTS.get(node.op_type, ()):
                name = node.input[j] if j < len(node.input) else ""
                if not name or name in self.flat.initializers or name not in self.data_free:
                    continue
                value = self.const(name)
                if value is not None and value.size <= 4096:
                    found[(k, j)] = value
        return found


# -- fast paths (no copies of large weights) ---------------------------------------------

def _fold_identity(inputs, attrs):
    return inputs[0]


def _fold_cast(inputs, attrs):
    from onnx import helper

    try:
        dtype = helper.tensor_dtype_to_np_dtype(int(attrs["to"]))
    except Exception:  # noqa: BLE001 - exotic types: let the reference evaluator decide
        return None
    return inputs[0].astype(dtype, copy=False)


def _fold_reshape(inputs, attrs):
    data, shape = inputs[0], [int(s) for s in np.asarray(inputs[1]).reshape(-1)]
    if not int(attrs.get("allowzero", 0)):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _fold_transpose(inputs, attrs):
    perm = attrs.get("perm")
    return np.transpose(inputs[0], None if perm is None else [int(p) for p in perm])


def _fold_dequantize(inputs, attrs):
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if attrs.get("block_size") or x.dtype.kind not in "iu":
        return None
    try:
        return dequantize(x, scale, zero, axis=int(attrs.get("axis", 1)) % max(x.ndim, 1))
    except ValueError:  # a scale of another shape: let the reference evaluator decide
        return None


_FAST_FOLDS = {"Identity": _fold_identity, "Cast": _fold_cast, "Reshape": _fold_reshape,
               "Transpose": _fold_transpose, "DequantizeLinear": _fold_dequantize}


def _reference_evaluate(node: Any, inputs: list[np.ndarray | None], model: Any) -> list[np.ndarray] | None:
    """Evaluate one node on constant inputs with onnx's reference implementation."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type in NONDETERMINISTIC:
        return None
    names = [f"in{k}" if name else "" for k, name in enumerate(node.input)]
    feeds = {n: v for n, v in zip(names, inputs) if n}
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in feeds.items()]
    outputs = [f"out{k}" if name else "" for k, name in enumerate(node.output)]
    single = helper.make_node(node.op_type, names, outputs, domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "fold", graph_inputs,
                              [helper.make_empty_tensor_value_info(o) for o in outputs if o])
    small = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    results = ReferenceEvaluator(small).run(None, feeds)
    values = iter(results)
    return [np.asarray(next(values)) if o else None for o in outputs]
