"""Layer recognition: Conv, ConvTranspose, Gemm and MatMul nodes become layers, with exact padding.

A conv's kernel size is read from its weight (``kernel_shape`` is optional in
ONNX and, where given, only checked).  Padding is one (begin, end) pair per
axis: explicit ``pads``, ``auto_pad`` (SAME with a stride needs the input
size), and a constant-zero ``Pad`` that feeds only the conv is absorbed.
Layers inside a control-flow branch are named by their branch path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpa.backends.onnx.common import (DEFAULT_DOMAINS, WEIGHT_ROUTE, Skip, as_float, attributes, drop_batch,
                                      node_name, per_unit, text)
from hpa.backends.onnx.quantized import QUANTIZED_CONVS
from hpa.graph import Layer, Skipped, conv_output_size, unique_name

# Standard ops that carry weights hpa does not analyse.
WEIGHTED_UNSUPPORTED = {
    "QLinearMatMul": "quantized matmul (QLinearMatMul) is not analysed",
    "MatMulInteger": "integer matmul (MatMulInteger) is not analysed",
    "LSTM": "recurrent layers (LSTM) are not analysed", "GRU": "recurrent layers (GRU) are not analysed",
    "RNN": "recurrent layers (RNN) are not analysed", "DeformConv": "deformable convs are not analysed",
    "Einsum": "Einsum is not analysed as a layer",
}
# Initializer names that name a layer, by their suffix: torch's, and onnxruntime's for a quantized weight.
_WEIGHT_SUFFIXES = (".weight", ".weight_quantized")


@dataclass(eq=False)
class Entry:
    layer: Layer
    node: Any
    data_input: str  # the value feeding the layer (before an absorbed Pad)
    ends: list[str] = field(default_factory=list)  # values that stand for this layer's output


class Layers:
    """Mixin of the builder: the node -> layer recognisers.

    Expects ``self.flat``, ``self.shapes``, ``self.producer``, ``self.consumers``,
    ``self.labels``, ``self.used_names``, ``self.skipped``, ``self.opset``, ``const`` and the
    quantized convs of :class:`~hpa.backends.onnx.quantized.Quantized`.
    """

    def _layer_entry(self, node: Any) -> Entry | None:
        if node.domain not in DEFAULT_DOMAINS:
            return None
        try:
            if node.op_type in ("Conv", "ConvTranspose"):
                return self._conv(node)
            if node.op_type in QUANTIZED_CONVS:
                return self._quantized_conv(node)
            if node.op_type == "Gemm":
                return self._gemm(node)
            if node.op_type == "MatMul":
                return self._matmul(node)
        except Skip as skip:
            self.skipped.append(Skipped(self._scoped(node, node_name(node)), f"{node.op_type}: {skip}"))
        return None

    def _conv(self, node: Any) -> Entry:
        x, w_name, b_name = (list(node.input) + ["", ""])[:3]
        entry = self._conv_layer(node, x, w_name, self._weight(w_name, "weight"), lambda units: self._bias(b_name, units))
        entry.layer.quantization = self._weight_quantization(w_name)  # QDQ: a DequantizeLinear weight
        return entry

    def _conv_layer(self, node: Any, x: str, w_name: str, weight: np.ndarray, bias_of) -> Entry:
        """The layer of a conv-like node with ``weight`` (its bias: ``bias_of(output channels)``)."""
        transposed = node.op_type == "ConvTranspose"
        dims = weight.ndim - 2
        if dims not in (1, 2, 3):
            raise Skip(f"a {weight.ndim}-D weight {tuple(weight.shape)} is not a 1-D, 2-D or 3-D conv")
        attrs = attributes(node)
        kernel = tuple(weight.shape[2:])
        declared = attrs.get("kernel_shape")
        if declared is not None and tuple(declared) != kernel:
            raise Skip(f"kernel_shape {list(declared)} does not match the weight's {list(kernel)}")
        groups = int(attrs.get("group", 1))
        stride = tuple(int(s) for s in attrs.get("strides", [1] * dims))
        dilation = tuple(int(d) for d in attrs.get("dilations", [1] * dims))
        bias = bias_of(weight.shape[1] * groups if transposed else weight.shape[0])
        in_shape = self.shapes.get(x)
        out_shape = self.shapes.get(node.output[0])
        if transposed:
            padding, output_padding = self._transposed_padding(attrs, kernel, stride, dilation, in_shape)
        else:
            padding, output_padding = self._conv_padding(attrs, kernel, stride, dilation, in_shape), None
        kind = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
        layer = Layer(name=self._layer_name(node, w_name), index=0, kind=kind, weight=as_float(weight),
                      bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      output_padding=output_padding, input_shape=drop_batch(in_shape),
                      output_shape=drop_batch(out_shape))
        entry = Entry(layer, node, x, [node.output[0]])
        if not transposed and padding is not None:
            self._absorb_zero_pad(entry)
        if layer.output_shape is None:
            layer.output_shape = conv_output_shape(layer)
        return entry

    def _conv_padding(self, attrs, kernel, stride, dilation, in_shape):
        dims = len(kernel)
        auto_pad = text(attrs.get("auto_pad", "NOTSET"))
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
        auto_pad = text(attrs.get("auto_pad", "NOTSET"))
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

    def _absorb_zero_pad(self, entry: Entry) -> None:
        """Fold a constant-zero Pad that feeds only this conv into its (begin, end) padding pairs."""
        pad = self.producer.get(entry.data_input)
        layer = entry.layer
        if pad is None or pad.op_type != "Pad" or pad.domain not in DEFAULT_DOMAINS:
            return
        if len(self.consumers[entry.data_input]) != 1 or entry.data_input in self.flat.outputs:
            return
        attrs = attributes(pad)
        if text(attrs.get("mode", "constant")) != "constant":
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
        layer.input_shape = drop_batch(self.shapes.get(pad.input[0]))
        self.labels[id(pad)] = "pad"

    def _gemm(self, node: Any) -> Entry:
        a, b, c = (list(node.input) + ["", ""])[:3]
        attrs = attributes(node)
        a_const, b_const = self.const(a), self.const(b)
        if b_const is None:
            if a_const is not None:
                raise Skip("the constant is the left operand (weight @ data); not a linear layer of the input")
            raise Skip(f"weight {b!r} is computed at run time, not a constant; not analysed")
        if a_const is not None:
            raise Skip("both operands are constant; nothing depends on the input")
        if int(attrs.get("transA", 0)):
            raise Skip("transA=1 (transposed data) is not a linear layer of the input's rows")
        if b_const.ndim != 2:
            raise Skip(f"weight {b!r} is {b_const.ndim}-D, not a matrix")
        weight = b_const if int(attrs.get("transB", 0)) else b_const.T
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha != 1.0:
            weight = np.asarray(weight, np.float64) * alpha
        bias = None
        if c:
            value = self.const(c)
            if value is None:
                raise Skip(f"bias {c!r} is computed at run time, not a constant")
            bias = per_unit(value, weight.shape[0], axis_from_end=0)
            if bias is None:
                raise Skip(f"bias of shape {list(value.shape)} is not one value per output unit")
            bias = bias * beta if beta != 1.0 else bias
        return self._linear_entry(node, a, b, weight, bias)

    def _matmul(self, node: Any) -> Entry | None:
        x, w = node.input[0], node.input[1]
        x_const, w_const = self.const(x), self.const(w)
        if w_const is None:
            return None  # data @ data (attention and the like): an op, not a layer
        if x_const is not None:
            raise Skip("both operands are constant; nothing depends on the input")
        if w_const.ndim != 2:
            raise Skip(f"constant operand {w!r} is {w_const.ndim}-D, not a weight matrix")
        entry = self._linear_entry(node, x, w, w_const.T, None)
        self._matmul_bias(entry)
        return entry

    def _matmul_bias(self, entry: Entry) -> None:
        """MatMul + Add(constant vector) is one linear layer with a bias, folding or not."""
        out = entry.ends[-1]
        consumers = self.consumers[out]
        if len(consumers) != 1 or out in self.flat.outputs:
            return
        add = consumers[0]
        if add.op_type != "Add" or len(add.input) != 2:
            return
        other = add.input[1] if add.input[0] == out else add.input[0]
        value = self.const(other)
        bias = None if value is None else per_unit(value, entry.layer.weight.shape[0], axis_from_end=0)
        if bias is None:
            return
        entry.layer.bias = bias
        entry.ends.append(add.output[0])
        entry.layer.output_shape = drop_batch(self.shapes.get(add.output[0])) or entry.layer.output_shape

    def _linear_entry(self, node, x, w_name, weight, bias) -> Entry:
        layer = Layer(name=self._layer_name(node, w_name), index=0, kind="linear", weight=as_float(weight),
                      bias=bias, stride=(), padding=(), dilation=(), groups=1,
                      input_shape=drop_batch(self.shapes.get(x)),
                      output_shape=drop_batch(self.shapes.get(node.output[0])))
        return Entry(layer, node, x, [node.output[0]])

    def _weight(self, name: str, what: str) -> np.ndarray:
        value = self.const(name)
        if value is None:
            raise Skip(f"{what} {name!r} is computed at run time, not a constant; not analysed")
        if value.dtype.kind not in "fiu":
            raise Skip(f"{what} {name!r} has type {value.dtype}, not numbers")
        return value

    def _bias(self, name: str, units: int) -> np.ndarray | None:
        if not name:
            return None
        value = self.const(name)
        if value is None:
            raise Skip(f"bias {name!r} is computed at run time, not a constant; not analysed")
        bias = per_unit(value, units)
        if bias is None:
            raise Skip(f"bias of shape {list(value.shape)} is not one value per output channel")
        return bias

    def _layer_name(self, node: Any, weight_name: str) -> str:
        """The weight's initializer name without ``.weight``, else the node's name; in a branch, its path first."""
        root = self._root_constant(weight_name)
        suffix = next((suffix for suffix in _WEIGHT_SUFFIXES if root.endswith(suffix)), None)
        if suffix:
            name = root[: -len(suffix)]
        else:
            name = node.name or node.output[0] or weight_name
        return unique_name(self._scoped(node, name), self.used_names)

    def _scoped(self, node: Any, name: str) -> str:
        """``name`` under the branch path of ``node`` (names inside a branch may already carry it)."""
        branch = self.flat.branch.get(id(node))
        if branch is None or name.startswith(branch + "/"):
            return name
        return f"{branch}/{name.lstrip('/')}"

    def _root_constant(self, name: str) -> str:
        """The initializer a weight comes from, through Identity/Cast/Reshape/... chains."""
        for _ in range(64):
            if name in self.flat.initializers:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in WEIGHT_ROUTE:
                return name
            name = node.input[0]
        return name


def conv_output_shape(layer: Layer) -> tuple[int, ...] | None:
    """The output shape by the conv arithmetic, where shape inference could not tell."""
    if layer.input_shape is None or layer.padding is None or len(layer.input_shape) != layer.weight.ndim - 1:
        return None
    sizes = []
    for i, size in enumerate(layer.input_shape[1:]):
        padding, k, s, d = layer.padding[i], layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        if layer.transposed:
            sizes.append((size - 1) * s - sum(padding) + d * (k - 1) + layer.output_padding[i] + 1)
        else:
            sizes.append(conv_output_size(size, k, s, padding, d))
    return (layer.out_channels, *sizes)
