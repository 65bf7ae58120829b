"""Turn an ONNX model into a :class:`~hpa.graph.ConvGraph`.

The file is read by :mod:`hpa.backends.onnx_file` (large tensors stay in the
memory-mapped file).  Shapes come from ONNX shape inference, with the input
size taken from the model or, where the model leaves it symbolic, from
``--input-size``.  Weights and biases are resolved whatever route they take
into a node: initializers, ``Constant`` nodes, ``Identity``/``Cast``/
``Reshape``/``Transpose`` chains, ``DequantizeLinear``, external data, and any
other constant subgraph (``ConstantOfShape``, ``Concat`` of shapes, ...),
which is folded by evaluating it with ``onnx.reference``.

Names of ops on the way between layers (``via``) follow the torch tracer
(``max_pool2d``, ``cat``, ``adaptive_avg_pool2d``, ``interpolate``, ...), so
that a model and its ONNX export give the same graph.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpa.backends.onnx_file import OnnxFile, read_onnx
from hpa.dataflow import predecessors
from hpa.errors import LoadError, OptionError
from hpa.fold import fold_affine, fold_batchnorm
from hpa.graph import INPUT, ConvGraph, Layer, Skipped
from hpa.registry import LoadOptions

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops whose outputs are never constant even when their inputs are.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "If", "Loop", "Scan"}
# Standard ops that carry weights hpa does not analyse.
_WEIGHTED_UNSUPPORTED = {
    "ConvInteger": "integer conv (ConvInteger) is not analysed; export with DequantizeLinear weights instead",
    "QLinearConv": "quantized conv (QLinearConv) is not analysed; export with QDQ (DequantizeLinear) weights",
    "QLinearMatMul": "quantized matmul (QLinearMatMul) is not analysed",
    "MatMulInteger": "integer matmul (MatMulInteger) is not analysed",
    "LSTM": "recurrent layers (LSTM) are not analysed", "GRU": "recurrent layers (GRU) are not analysed",
    "RNN": "recurrent layers (RNN) are not analysed", "DeformConv": "deformable convs are not analysed",
    "Einsum": "Einsum is not analysed as a layer",
    "If": "subgraphs (If) are not analysed; layers inside them are missing",
    "Loop": "subgraphs (Loop) are not analysed; layers inside them are missing",
    "Scan": "subgraphs (Scan) are not analysed; layers inside them are missing",
}
# Inputs that are shapes, sizes, axes or pads rather than data.
_SHAPE_ARGUMENTS = {
    "Pad": (1, 2, 3), "Reshape": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "Expand": (1,), "Tile": (1,),
    "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "ConstantOfShape": (0,), "Split": (1,),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "Range": (0, 1, 2),
    "TopK": (1,), "OneHot": (1,), "CenterCropPad": (1,), "Col2Im": (1, 2),
}
# ONNX op -> activation name (single-node activations).
_ACTIVATIONS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Tanh": "tanh", "Sigmoid": "sigmoid",
    "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Softplus": "softplus", "Softsign": "softsign", "Mish": "mish", "Gelu": "gelu",
    "ThresholdedRelu": "threshold",
}
# Ops an activation search passes through, as the torch tracer passes dropout.
_TRANSPARENT = {"Identity", "Dropout"}
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


def load_onnx(path: str, options: LoadOptions) -> ConvGraph:
    """Read ``path`` and build its normalized graph."""
    if options.weights not in (None, ""):
        raise OptionError("an ONNX file holds its own weights; --weights does not apply to the onnx loader "
                          "(use --init PATH to compare against another file)")
    onnx_file = read_onnx(path)
    model = onnx_file.model
    # Fold shape arguments computed by constant subgraphs (a Pad's pads, a Reshape's shape) first,
    # so that shape inference can see through them.
    folded = _Builder(onnx_file, {}, options).shape_arguments()
    shapes, input_shape, notes = infer_shapes(model, options.input_size, str(onnx_file.path), folded)
    builder = _Builder(onnx_file, shapes, options)
    layers = builder.build()
    source: dict[str, Any] = {
        "file": str(onnx_file.path),
        "format": "onnx",
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": int(model.ir_version),
        "opset": builder.opset,
        "input_size": None if input_shape is None or None in input_shape else list(input_shape),
        "fold_bn": options.fold_bn,
    }
    if onnx_file.external_files:
        source["external_data"] = sorted(onnx_file.external_files)
    if notes:
        source["notes"] = notes
    static_input = None if input_shape is None or None in input_shape else tuple(input_shape)
    return ConvGraph(layers, source=source, skipped=builder.skipped, input_shape=static_input)


# -- shapes -------------------------------------------------------------------------------

Shape = tuple  # of int | None per dimension, batch included


def infer_shapes(model: Any, input_size: tuple[int, ...] | None, what: str,
                 folded: dict[tuple[int, int], np.ndarray] | None = None):
    """Value name -> shape (batch included, None for unknown dims); the input shape; notes.

    ``folded`` maps (node index, input index) to a constant that replaces that
    input in the copy the inference runs on.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in initializers]
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work_inputs = [i for i in work.graph.input if i.name not in initializers]
    for value in work_inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = 1  # a symbolic batch
    for (k, j), value in (folded or {}).items():
        name = f"__hpa_folded_{k}_{j}"
        work.graph.node[k].input[j] = name
        work.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if model.ir_version < 4:  # initializers had to be listed as inputs too
            work.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
    input_shape = None
    if data_inputs:
        first = work_inputs[0].type.tensor_type
        if input_size is not None:
            if first.HasField("shape") and len(first.shape.dim) != len(input_size) + 1:
                raise OptionError(f"--input-size {','.join(map(str, input_size))} has {len(input_size)} "
                                  f"dimensions but the model input {data_inputs[0].name!r} has "
                                  f"{len(first.shape.dim)} (batch included)")
            first.shape.ClearField("dim")
            for size in (1, *input_size):
                first.shape.dim.add().dim_value = int(size)
            work.graph.ClearField("value_info")  # stale shapes would fight the new input size
            for out in work.graph.output:
                out.type.tensor_type.ClearField("shape")
        input_shape = _shape_of(work_inputs[0])
        if input_shape is not None:
            input_shape = input_shape[1:]
        if input_shape is None or None in input_shape:
            notes.append(f"the model input {data_inputs[0].name!r} has a symbolic size; pass --input-size "
                         "C,H,W to get layer shapes")
    try:
        inferred = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shapes are optional; the weights are not
        if input_size is not None:
            raise LoadError(f"ONNX shape inference failed for {what} with --input-size "
                            f"{','.join(map(str, input_size))}: {str(exc).splitlines()[0]}") from None
        notes.append(f"ONNX shape inference failed ({type(exc).__name__}); layer shapes are unknown")
        inferred = work
    shapes: dict[str, Shape] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = _shape_of(value)
        if shape is not None:
            shapes[value.name] = shape
    for tensor in model.graph.initializer:
        shapes.setdefault(tensor.name, tuple(int(d) for d in tensor.dims))
    return shapes, input_shape, notes


def _shape_of(value: Any) -> Shape | None:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


# -- the builder -----------------------------------------------------------------------------

@dataclass(eq=False)
class _Entry:
    layer: Layer
    node: Any
    data_input: str  # the value feeding the layer (before an absorbed Pad)
    ends: list[str] = field(default_factory=list)  # values that stand for this layer's output


class _Builder:
    def __init__(self, onnx_file: OnnxFile, shapes: dict[str, Shape], options: LoadOptions) -> None:
        self.file = onnx_file
        self.model = onnx_file.model
        self.graph = self.model.graph
        self.shapes = shapes
        self.options = options
        self.opset = next((int(o.version) for o in self.model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in dict.fromkeys(i for i in node.input if i):
                self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self.data_free = self._data_free_values()
        self.cache: dict[str, np.ndarray | None] = {}
        self.skipped: list[Skipped] = []
        self.labels: dict[int, str] = {}  # id(node) -> via name for nodes of recognised patterns
        self.collapsed: dict[int, str] = {}  # id(last node of a multi-node activation) -> its input
        self.used_names: dict[str, int] = {}

    # -- constants ------------------------------------------------------------------------

    def _data_free_values(self) -> set[str]:
        """Values that do not depend on the data of any graph input (constants and shapes)."""
        free = set(self.initializers)
        for node in self.graph.node:
            inputs = [i for i in node.input if i]
            if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NONDETERMINISTIC:
                continue
            if node.op_type in ("Constant", "Shape", "Size") or (inputs and all(i in free for i in inputs)):
                free.update(o for o in node.output if o)
        return free

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant the file determines, else None."""
        if not name or name not in self.data_free:
            return None
        if name not in self.cache:
            if name in self.initializers:
                self.cache[name] = self.file.tensor(self.initializers[name])
            else:
                self._fold(self.producer[name])
        return self.cache.get(name)

    def _fold(self, node: Any) -> None:
        outputs = list(node.output)
        try:
            values = self._evaluate(node)
        except LoadError:  # a damaged tensor is the user's problem, not a non-constant
            raise
        except Exception:  # noqa: BLE001 - a subgraph onnx cannot evaluate is simply not constant
            values = None
        for k, out in enumerate(outputs):
            if out:
                self.cache[out] = None if values is None or k >= len(values) else values[k]

    def _evaluate(self, node: Any) -> list[np.ndarray] | None:
        op = node.op_type
        attrs = _attributes(node)
        if op == "Constant":
            return [self._constant_attribute(node)]
        if op in ("Shape", "Size"):
            shape = self.shapes.get(node.input[0])
            if shape is None or None in shape:
                value = self.const(node.input[0])
                if value is None:
                    return None
                shape = value.shape
            if op == "Size":
                return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
            start, end = attrs.get("start", 0), attrs.get("end")
            return [np.array(shape[start:end], dtype=np.int64)]
        inputs = [self.const(i) if i else None for i in node.input]
        if any(i and v is None for i, v in zip(node.input, inputs)):
            return None
        fast = _FAST_FOLDS.get(op)
        if fast is not None:
            result = fast(inputs, attrs)
            if result is not None:
                return [result]
        return _reference_evaluate(node, inputs, self.model)

    def _constant_attribute(self, node: Any) -> np.ndarray | None:
        from onnx import helper

        for attr in node.attribute:
            if attr.name == "value":
                return self.file.tensor(attr.t)
            if attr.name in ("value_float", "value_floats"):
                return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
            if attr.name in ("value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
        return None  # sparse or string constants: not weights

    def shape_arguments(self) -> dict[tuple[int, int], np.ndarray]:
        """Small constants computed by subgraphs that feed shape arguments: (node, input) -> value."""
        found = {}
        for k, node in enumerate(self.graph.node):
            for j in _SHAPE_ARGUMENTS.get(node.op_type, ()) if node.domain in _DEFAULT_DOMAINS else ():
                name = node.input[j] if j < len(node.input) else ""
                if not name or name in self.initializers or name not in self.data_free:
                    continue
                value = self.const(name)
                if value is not None and value.size <= 4096:
                    found[(k, j)] = value
        return found

    # -- the walk ---------------------------------------------------------------------------

    def build(self) -> list[Layer]:
        entries: list[_Entry] = []
        consumed: set[int] = set()  # ids of nodes folded into a layer or absorbed
        for node in self.graph.node:
            if id(node) in consumed:
                continue
            entry = self._layer_entry(node)
            if entry is not None:
                entry.layer.index = len(entries)
                entries.append(entry)
                consumed.update(self._finish_layer(entry))
            else:
                self._note_unknown(node)
        self._predecessors(entries)
        return [entry.layer for entry in entries]

    def _layer_entry(self, node: Any) -> _Entry | None:
        if node.domain not in _DEFAULT_DOMAINS:
            return None
        try:
            if node.op_type in ("Conv", "ConvTranspose"):
                return self._conv(node)
            if node.op_type == "Gemm":
                return self._gemm(node)
            if node.op_type == "MatMul":
                return self._matmul(node)
        except _Skip as skip:
            self.skipped.append(Skipped(_node_name(node), f"{node.op_type}: {skip}"))
        return None

    def _note_unknown(self, node: Any) -> None:
        import onnx

        op = node.op_type
        if node.domain in _DEFAULT_DOMAINS and op in _WEIGHTED_UNSUPPORTED:
            self.skipped.append(Skipped(_node_name(node), f"{op}: {_WEIGHTED_UNSUPPORTED[op]}"))
            return
        domain = node.domain or "ai.onnx"
        try:
            known = onnx.defs.has(op, node.domain)
        except Exception:  # noqa: BLE001
            known = False
        if not known:
            self.skipped.append(Skipped(_node_name(node), f"{domain}::{op}: unknown operator, not analysed "
                                        "(predecessors are traced through it)"))

    # -- layer kinds ---------------------------------------------------------------------------

    def _conv(self, node: Any) -> _Entry:
        x, w_name, b_name = (list(node.input) + ["", ""])[:3]
        transposed = node.op_type == "ConvTranspose"
        weight = self._weight(w_name, "weight")
        dims = weight.ndim - 2
        if dims not in (1, 2, 3):
            raise _Skip(f"a {weight.ndim}-D weight {tuple(weight.shape)} is not a 1-D, 2-D or 3-D conv")
        attrs = _attributes(node)
        kernel = tuple(weight.shape[2:])
        declared = attrs.get("kernel_shape")
        if declared is not None and tuple(declared) != kernel:
            raise _Skip(f"kernel_shape {list(declared)} does not match the weight's {list(kernel)}")
        groups = int(attrs.get("group", 1))
        stride = tuple(int(s) for s in attrs.get("strides", [1] * dims))
        dilation = tuple(int(d) for d in attrs.get("dilations", [1] * dims))
        bias = self._bias(b_name, weight.shape[1] * groups if transposed else weight.shape[0])
        in_shape = self.shapes.get(x)
        out_shape = self.shapes.get(node.output[0])
        if transposed:
            padding, output_padding = self._transposed_padding(attrs, kernel, stride, dilation, in_shape)
        else:
            padding, output_padding = self._conv_padding(attrs, kernel, stride, dilation, in_shape), None
        kind = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
        layer = Layer(name=self._layer_name(node, w_name), index=0, kind=kind, weight=_float(weight),
                      bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      output_padding=output_padding, input_shape=_drop_batch(in_shape),
                      output_shape=_drop_batch(out_shape))
        entry = _Entry(layer, node, x, [node.output[0]])
        if not transposed and padding is not None:
            self._absorb_zero_pad(entry)
        if layer.output_shape is None:
            layer.output_shape = _conv_output_shape(layer)
        return entry

    def _conv_padding(self, attrs, kernel, stride, dilation, in_shape):
        dims = len(kernel)
        auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
        if auto_pad in ("NOTSET", ""):
            pads = [int(p) for p in attrs.get("pads", [0] * 2 * dims)]
            return tuple((pads[i], pads[i + dims]) for i in range(dims))
        if auto_pad == "VALID":
            return tuple((0, 0) for _ in range(dims))
        pairs = []
        for i in range(dims):
            extent = dilation[i] * (kernel[i] - 1) + 1
            if stride[i] == 1:
                total = extent - 1
            else:
                size = None if in_shape is None or len(in_shape) != dims + 2 else in_shape[2 + i]
                if size is None:
                    return None  # SAME with a stride needs the input size
                total = max(0, (-(-size // stride[i]) - 1) * stride[i] + extent - size)
            small, large = total // 2, total - total // 2
            pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return tuple(pairs)

    def _transposed_padding(self, attrs, kernel, stride, dilation, in_shape):
        dims = len(kernel)
        output_padding = [int(p) for p in attrs.get("output_padding", [0] * dims)]
        auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
        output_shape = attrs.get("output_shape")
        if output_shape is None and auto_pad in ("NOTSET", "", "VALID"):
            pads = [int(p) for p in attrs.get("pads", [0] * 2 * dims)] if auto_pad != "VALID" else [0] * 2 * dims
            return tuple((pads[i], pads[i + dims]) for i in range(dims)), tuple(output_padding)
        sizes = None if in_shape is None or len(in_shape) != dims + 2 else in_shape[2:]
        if sizes is None or None in sizes:
            return None, tuple(output_padding)
        if output_shape is None:
            output_shape = [sizes[i] * stride[i] for i in range(dims)]
        output_shape = list(output_shape)[-dims:]
        pairs = []
        for i in range(dims):
            total = (stride[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilation[i] + 1
                     - output_shape[i])
            if total < 0:  # the output is longer than the kernel reaches: extra output padding
                output_padding[i] -= total
                total = 0
            small, large = total // 2, total - total // 2
            pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return tuple(pairs), tuple(output_padding)

    def _absorb_zero_pad(self, entry: _Entry) -> None:
        """Fold a constant-zero Pad that feeds only this conv into its (begin, end) padding pairs."""
        pad = self.producer.get(entry.data_input)
        layer = entry.layer
        if pad is None or pad.op_type != "Pad" or pad.domain not in _DEFAULT_DOMAINS:
            return
        if len(self.consumers[entry.data_input]) != 1 or entry.data_input in self.outputs:
            return
        attrs = _attributes(pad)
        if _text(attrs.get("mode", "constant")) != "constant":
            return
        if self.opset < 11 or "pads" in attrs:
            pads, value = attrs.get("pads"), attrs.get("value", 0.0)
        else:
            pads = self.const(pad.input[1]) if len(pad.input) > 1 else None
            value = self.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0.0
        if pads is None or value is None or np.any(np.asarray(value) != 0):
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = layer.weight.ndim
        axes = list(range(rank))
        if len(pad.input) > 3 and pad.input[3]:
            given = self.const(pad.input[3])
            if given is None:
                return
            axes = [int(a) % rank for a in np.asarray(given).reshape(-1)]
        if len(pads) != 2 * len(axes):
            return
        full = [0] * (2 * rank)
        for k, axis in enumerate(axes):
            full[axis], full[axis + rank] = pads[k], pads[k + len(axes)]
        if any(full[a] or full[a + rank] for a in (0, 1)) or min(full) < 0:
            return
        layer.padding = tuple((b + full[2 + i], e + full[2 + i + rank])
                              for i, (b, e) in enumerate(layer.padding))
        entry.data_input = pad.input[0]
        layer.input_shape = _drop_batch(self.shapes.get(pad.input[0]))
        self.labels[id(pad)] = "pad"

    def _gemm(self, node: Any) -> _Entry:
        a, b, c = (list(node.input) + ["", ""])[:3]
        attrs = _attributes(node)
        a_const, b_const = self.const(a), self.const(b)
        if b_const is None:
            if a_const is not None:
                raise _Skip("the constant is the left operand (weight @ data); not a linear layer of the input")
            raise _Skip(f"weight {b!r} is computed at run time, not a constant; not analysed")
        if a_const is not None:
            raise _Skip("both operands are constant; nothing depends on the input")
        if int(attrs.get("transA", 0)):
            raise _Skip("transA=1 (transposed data) is not a linear layer of the input's rows")
        if b_const.ndim != 2:
            raise _Skip(f"weight {b!r} is {b_const.ndim}-D, not a matrix")
        weight = b_const if int(attrs.get("transB", 0)) else b_const.T
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            weight = np.asarray(weight, np.float64) * alpha
        bias = None
        if c:
            value = self.const(c)
            if value is None:
                raise _Skip(f"bias {c!r} is computed at run time, not a constant")
            bias = _per_unit(value, weight.shape[0], axis_from_end=0)
            if bias is None:
                raise _Skip(f"bias of shape {list(value.shape)} is not one value per output unit")
            bias = bias * beta if beta != 1.0 else bias
        return self._linear_entry(node, a, b, weight, bias)

    def _matmul(self, node: Any) -> _Entry | None:
        x, w = node.input[0], node.input[1]
        x_const, w_const = self.const(x), self.const(w)
        if w_const is None:
            return None  # data @ data (attention and the like): an op, not a layer
        if x_const is not None:
            raise _Skip("both operands are constant; nothing depends on the input")
        if w_const.ndim != 2:
            raise _Skip(f"constant operand {w!r} is {w_const.ndim}-D, not a weight matrix")
        entry = self._linear_entry(node, x, w, w_const.T, None)
        self._matmul_bias(entry)
        return entry

    def _matmul_bias(self, entry: _Entry) -> None:
        """MatMul + Add(constant vector) is one linear layer with a bias, folding or not."""
        out = entry.ends[-1]
        consumers = self.consumers[out]
        if len(consumers) != 1 or out in self.outputs:
            return
        add = consumers[0]
        if add.op_type != "Add" or len(add.input) != 2:
            return
        other = add.input[1] if add.input[0] == out else add.input[0]
        value = self.const(other)
        bias = None if value is None else _per_unit(value, entry.layer.weight.shape[0], axis_from_end=0)
        if bias is None:
            return
        entry.layer.bias = bias
        entry.ends.append(add.output[0])
        entry.layer.output_shape = _drop_batch(self.shapes.get(add.output[0])) or entry.layer.output_shape

    def _linear_entry(self, node, x, w_name, weight, bias) -> _Entry:
        layer = Layer(name=self._layer_name(node, w_name), index=0, kind="linear", weight=_float(weight),
                      bias=bias, stride=(), padding=(), dilation=(), groups=1,
                      input_shape=_drop_batch(self.shapes.get(x)),
                      output_shape=_drop_batch(self.shapes.get(node.output[0])))
        return _Entry(layer, node, x, [node.output[0]])

    def _weight(self, name: str, what: str) -> np.ndarray:
        value = self.const(name)
        if value is None:
            raise _Skip(f"{what} {name!r} is computed at run time, not a constant; not analysed")
        if value.dtype.kind not in "fiu":
            raise _Skip(f"{what} {name!r} has type {value.dtype}, not numbers")
        return value

    def _bias(self, name: str, units: int) -> np.ndarray | None:
        if not name:
            return None
        value = self.const(name)
        if value is None:
            raise _Skip(f"bias {name!r} is computed at run time, not a constant; not analysed")
        bias = _per_unit(value, units)
        if bias is None:
            raise _Skip(f"bias of shape {list(value.shape)} is not one value per output channel")
        return bias

    def _layer_name(self, node: Any, weight_name: str) -> str:
        root = self._root_constant(weight_name)
        if root.endswith(".weight"):
            name = root[: -len(".weight")]
        else:
            name = node.name or node.output[0] or weight_name
        count = self.used_names.get(name, 0) + 1
        self.used_names[name] = count
        return name if count == 1 else f"{name}#{count}"

    def _root_constant(self, name: str) -> str:
        """The initializer a weight comes from, through Identity/Cast/Reshape/... chains."""
        for _ in range(64):
            if name in self.initializers:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Identity", "Cast", "Reshape", "Transpose", "Squeeze",
                                                    "Unsqueeze", "DequantizeLinear", "Flatten"):
                return name
            name = node.input[0]
        return name

    # -- what follows a layer -----------------------------------------------------------------------

    def _finish_layer(self, entry: _Entry) -> set[int]:
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
        if len(consumers) != 1 or value in self.outputs:
            return None
        return consumers[0]

    def _fold_next(self, entry: _Entry) -> Any | None:
        out = entry.ends[-1]
        node = self._single_consumer(out)
        if node is None or node.domain not in _DEFAULT_DOMAINS:
            return None
        layer = entry.layer
        units = layer.out_channels
        if node.op_type == "BatchNormalization" and node.input[0] == out:
            values = [self.const(n) for n in node.input[1:5]]
            if len(values) < 4 or any(v is None for v in values):
                return None
            gamma, beta, mean, var = (v.reshape(-1) for v in values)
            if not all(v.size == units for v in (gamma, beta, mean, var)):
                return None
            eps = float(_attributes(node).get("epsilon", 1e-5))
            layer.weight, layer.bias = fold_batchnorm(
                layer.weight, layer.bias, mean, var, gamma, beta, eps=eps,
                out_axis=1 if layer.transposed else 0, groups=layer.groups or 1)
            layer.bn_folded = True
        elif node.op_type in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2:
            if not self._fold_affine(layer, node, out):
                return None
        else:
            return None
        entry.ends.append(node.output[0])
        return node

    def _fold_affine(self, layer: Layer, node: Any, out: str) -> bool:
        first = node.input[0] == out
        other = node.input[1] if first else node.input[0]
        if other == out:
            return False
        value = self.const(other)
        if value is None:
            return False
        per_unit = _per_unit(value, layer.out_channels,
                             axis_from_end=0 if layer.kind == "linear" else layer.weight.ndim - 2)
        if per_unit is None:
            return False
        op = node.op_type
        if op == "Div" and not first:
            return False  # c / y is not affine
        if op == "Mul":
            scale, shift = per_unit, None
        elif op == "Div":
            if np.any(per_unit == 0):
                return False
            scale, shift = 1.0 / per_unit, None
        elif op == "Add":
            scale, shift = None, per_unit
        else:  # Sub: y - c, or c - y
            scale, shift = (None, -per_unit) if first else (-np.ones_like(per_unit), per_unit)
        _apply_affine(layer, scale, shift)
        if scale is not None:
            layer.bn_folded = True
        return True

    def _activation(self, value: str) -> tuple[str, dict[str, float], list[Any], str]:
        """The nonlinearity applied to ``value``: (name, params, nodes it spans, its output)."""
        passable = set(_TRANSPARENT) | ({"BatchNormalization"} if not self.options.fold_bn else set())
        while True:
            consumers = self.consumers.get(value, [])
            if len(consumers) == 2:
                found = self._two_branch_activation(value, consumers)
                if found is not None:
                    return found
            node = self._single_consumer(value)
            if node is None or node.domain not in _DEFAULT_DOMAINS:
                return "none", {}, [], value
            if node.op_type in passable and node.input[0] == value:
                value = node.output[0]
                continue
            found = self._simple_activation(node)
            if found is None:
                return "none", {}, [], value
            return found[0], found[1], [node], node.output[0]

    def _simple_activation(self, node: Any) -> tuple[str, dict[str, float]] | None:
        op = node.op_type
        attrs = _attributes(node)
        if op == "Clip":
            if self.opset >= 11:
                lo = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
                hi = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                if (len(node.input) > 1 and node.input[1] and lo is None) or \
                        (len(node.input) > 2 and node.input[2] and hi is None):
                    return None
            else:
                lo, hi = attrs.get("min"), attrs.get("max")
            lo = None if lo is None else float(np.asarray(lo).reshape(-1)[0])
            hi = None if hi is None else float(np.asarray(hi).reshape(-1)[0])
            if lo is not None and math.isinf(lo) and lo < 0:
                lo = None
            if hi is not None and math.isinf(hi) and hi > 0:
                hi = None
            if lo == 0 and hi == 6:
                return "relu6", {}
            if lo == 0 and hi is None:
                return "relu", {}
            return "hardtanh", {k: v for k, v in (("min_val", lo), ("max_val", hi)) if v is not None}
        name = _ACTIVATIONS.get(op)
        if name is None:
            return None
        if name == "leaky_relu":
            return name, {"negative_slope": float(attrs.get("alpha", 0.01))}
        if name == "hardsigmoid":  # torch's F.hardsigmoid is x/6 + 1/2: no parameters to report
            alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
            torch_like = math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5
            return name, {} if torch_like else {"alpha": alpha, "beta": beta}
        if name == "elu":
            return name, {"alpha": float(attrs.get("alpha", 1.0))}
        if name == "gelu" and _text(attrs.get("approximate", "none")) == "tanh":
            return name, {"approximate_tanh": 1.0}
        return name, {}

    def _two_branch_activation(self, value: str, consumers: list[Any]):
        """x * sigmoid(x) (silu), x * hardsigmoid(x) (hardswish), or the erf form of gelu."""
        if value in self.outputs:
            return None
        for gate, mul in (consumers, consumers[::-1]):
            if mul.op_type != "Mul" or set(mul.input) != {value, gate.output[0]} or len(gate.input) < 1:
                if mul.op_type == "Mul" and value in mul.input:
                    found = self._erf_gelu(value, gate, mul)
                    if found is not None:
                        return found
                continue
            attrs = _attributes(gate)
            if gate.op_type == "Sigmoid":
                return "silu", {}, [gate, mul], mul.output[0]
            if gate.op_type == "HardSigmoid" and math.isclose(attrs.get("alpha", 0.2), 1 / 6, rel_tol=1e-4) \
                    and math.isclose(attrs.get("beta", 0.5), 0.5, rel_tol=1e-6):
                return "hardswish", {}, [gate, mul], mul.output[0]
        return None

    def _erf_gelu(self, value: str, scale: Any, mul: Any):
        """x * 0.5 * (1 + erf(x / sqrt(2))), as the torch exporter writes GELU before opset 20."""
        if scale.op_type not in ("Div", "Mul") or scale.input[0] != value:
            return None
        factor = self.const(scale.input[1])
        if factor is None or factor.size != 1:
            return None
        factor = float(factor.reshape(-1)[0])
        target = math.sqrt(2) if scale.op_type == "Div" else 1 / math.sqrt(2)
        if not math.isclose(factor, target, rel_tol=1e-4):
            return None
        nodes = [scale]
        erf = self._single_consumer(scale.output[0])
        if erf is None or erf.op_type != "Erf":
            return None
        add = self._single_consumer(erf.output[0])
        if add is None or add.op_type != "Add" or not self._is_scalar(add, erf.output[0], 1.0):
            return None
        nodes += [erf, add]
        current = add.output[0]
        half = self._single_consumer(current)
        if half is not None and half is not mul and half.op_type == "Mul" and self._is_scalar(half, current, 0.5):
            nodes.append(half)
            current = half.output[0]
        if set(mul.input) != {value, current}:
            return None
        nodes.append(mul)
        end = mul.output[0]
        if len(nodes) == 4:  # the 0.5 comes after the product
            last = self._single_consumer(end)
            if last is None or last.op_type != "Mul" or not self._is_scalar(last, end, 0.5):
                return None
            nodes.append(last)
            end = last.output[0]
        return "gelu", {}, nodes, end

    def _is_scalar(self, node: Any, value: str, expected: float) -> bool:
        other = node.input[1] if node.input[0] == value else node.input[0]
        constant = self.const(other)
        return constant is not None and constant.size == 1 and \
            math.isclose(float(constant.reshape(-1)[0]), expected, rel_tol=1e-5)

    # -- predecessors --------------------------------------------------------------------------------

    def _predecessors(self, entries: list[_Entry]) -> None:
        """Walk back from each layer's input over values, as the torch tracer walks its nodes."""
        ends = {value: entry.layer.name for entry in entries for value in entry.ends}
        graph_inputs = {v.name for v in self.graph.input if v.name not in self.initializers}

        def skip_transparent(value: str) -> str:
            # Identity and Dropout do nothing at inference and exporters drop them: not listed in via.
            node = self.producer.get(value)
            while node is not None and node.op_type in _TRANSPARENT and id(node) not in self.labels \
                    and value not in ends:
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
            return self.labels.get(id(node)) or _via_name(node, self.shapes)

        for entry in entries:
            names, via = predecessors([skip_transparent(entry.data_input)], endpoint, inputs, op, key=str)
            entry.layer.predecessors, entry.layer.via = names, via


class _Skip(Exception):
    """This node is a layer hpa cannot analyse; the message says why."""


# -- constant folding fast paths (no copies of large weights) ---------------------------------------------

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
    axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
    scale = np.asarray(scale, np.float32)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis] = scale.size
    values = x.astype(np.float32)
    if zero is not None:
        values -= np.asarray(zero, np.float32).reshape(shape if np.size(zero) > 1 else ())
    values *= scale.reshape(shape if scale.size > 1 else ())
    return values


_FAST_FOLDS = {"Identity": _fold_identity, "Cast": _fold_cast, "Reshape": _fold_reshape,
               "Transpose": _fold_transpose, "DequantizeLinear": _fold_dequantize}


def _reference_evaluate(node: Any, inputs: list[np.ndarray | None], model: Any) -> list[np.ndarray] | None:
    """Evaluate one node on constant inputs with onnx's reference implementation."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type in _NONDETERMINISTIC:
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


# -- small helpers --------------------------------------------------------------------------------------

def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type not in (5, 10)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _node_name(node: Any) -> str:
    return node.name or next((o for o in node.output if o), node.op_type)


def _drop_batch(shape: Shape | None) -> tuple[int, ...] | None:
    if shape is None or len(shape) < 1 or None in shape[1:]:
        return None
    return tuple(int(s) for s in shape[1:])


def _float(weight: np.ndarray) -> np.ndarray:
    """float32/float64 as they are (views stay views); other types as float32."""
    if weight.dtype in (np.float32, np.float64):
        return weight
    return weight.astype(np.float32)


def _per_unit(value: np.ndarray, units: int, axis_from_end: int | None = None) -> np.ndarray | None:
    """A constant holding one value per output unit, as a float64 vector; None if it is not one.

    ``axis_from_end`` says where the unit axis of the layer's output lies under
    numpy broadcasting: 0 for linear outputs (N, ..., C), ``dims`` for conv
    outputs (N, C, *spatial).  None accepts any shape with ``units`` values (a bias input).
    """
    value = np.asarray(value)
    if value.dtype.kind not in "fiu":
        return None
    if value.size == 1:
        return np.full(units, float(value.reshape(-1)[0]))
    if value.size != units:
        return None
    if axis_from_end is not None:
        index = value.ndim - 1 - axis_from_end
        if index < 0 or value.shape[index] != units:
            return None
    return np.asarray(value, np.float64).reshape(-1)


def _conv_output_shape(layer: Layer) -> tuple[int, ...] | None:
    """The output shape by the conv arithmetic, where shape inference could not tell."""
    if layer.input_shape is None or layer.padding is None or len(layer.input_shape) != layer.weight.ndim - 1:
        return None
    sizes = []
    for i, size in enumerate(layer.input_shape[1:]):
        (begin, end), k = layer.padding[i], layer.kernel_size[i]
        s, d = layer.stride[i], layer.dilation[i]
        if layer.transposed:
            sizes.append((size - 1) * s - begin - end + d * (k - 1) + layer.output_padding[i] + 1)
        else:
            sizes.append((size + begin + end - d * (k - 1) - 1) // s + 1)
    return (layer.out_channels, *sizes)


def _apply_affine(layer: Layer, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
    if scale is None:
        base = np.zeros(layer.out_channels) if layer.bias is None else np.asarray(layer.bias, np.float64)
        layer.bias = base + shift
        return
    if not layer.transposed:
        layer.weight, layer.bias = fold_affine(layer.weight, layer.bias, scale, shift)
        return
    groups = layer.groups or 1
    w = np.asarray(layer.weight, np.float64)
    in_ch, per_group = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, in_ch // groups, per_group, *w.shape[2:])
    layer.weight = (grouped * scale.reshape(groups, 1, per_group, *(1,) * (w.ndim - 2))).reshape(w.shape)
    base = np.zeros(layer.out_channels) if layer.bias is None else np.asarray(layer.bias, np.float64)
    layer.bias = base * scale + (0.0 if shift is None else shift)


def _via_name(node: Any, shapes: dict[str, Shape]) -> str:
    op = node.op_type
    template = _VIA_NAMES.get(op)
    if template is None:
        template = _ACTIVATIONS.get(op) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()
    if "{d}" in template:
        shape = shapes.get(node.input[0]) if node.input else None
        dims = len(shape) - 2 if shape is not None and len(shape) > 2 else 2
        template = template.format(d=dims)
    return template
