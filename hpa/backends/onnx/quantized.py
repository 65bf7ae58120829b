"""Quantized convs, analysed from their dequantized weights ``(q - zero_point) * scale``.

onnxruntime's quantizer writes three forms, and each is read here or in :mod:`~hpa.backends.onnx.layers`:

* ``quantize_dynamic``: ``DynamicQuantizeLinear(x) -> ConvInteger -> Cast -> Mul(x_scale * w_scale)
  -> Add(bias)``.  ConvInteger holds ``q`` and ``w_zero_point`` but not the weight's scale; that is
  the constant factor of the ``Mul`` after it, next to the input quantizer's own scale.  The layer
  spans the chain and reads the float input of the quantizer.
* ``quantize_static`` in QOperator format: ``QLinearConv`` holds every constant, its int32 bias in
  units of ``x_scale * w_scale``.
* QDQ format: ``DequantizeLinear -> Conv``, read as any conv whose weight is a constant subgraph;
  ``_weight_quantization`` records that its weight was quantized.

Scales and zero points are per tensor (a scalar) or per output channel (one value per filter), as
the ONNX operators define them; any other shape is a malformed file (:class:`LoadError`).  Each layer
records ``Layer.quantization``.  Quantize/dequantize ops pass data on (up to rounding), so
activation and predecessor searches pass through them; an output quantizer whose zero point is the
type's minimum clips at zero, which is the ReLU the quantizer fused into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpa.backends.onnx.common import DEFAULT_DOMAINS, WEIGHT_ROUTE, Skip, node_name, per_unit
from hpa.errors import LoadError

#: Ops that pass a tensor on, quantized or dequantized (input 0 is the data).
QUANTIZERS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
QUANTIZED_CONVS = ("ConvInteger", "QLinearConv")


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, as DequantizeLinear computes it; per tensor or along ``axis``.

    Raises ValueError when a scale or zero point is neither one value nor one per entry of ``axis``.
    """
    shape = [1] * q.ndim
    if q.ndim:
        shape[axis] = q.shape[axis]
    values = q.astype(np.float32)
    if zero_point is not None:
        values -= _broadcast(np.asarray(zero_point, np.float32), shape, axis)
    values *= _broadcast(np.asarray(scale, np.float32), shape, axis)
    return values


def _broadcast(value: np.ndarray, shape: list[int], axis: int) -> np.ndarray:
    if value.size == 1:
        return value.reshape(())
    if value.ndim != 1 or not shape or value.size != shape[axis]:
        raise ValueError(f"shape {list(value.shape)}")
    return value.reshape(shape)


def clips_at_zero(zero_point: np.ndarray | None, dtype: np.dtype) -> bool:
    """Whether a quantizer with this zero point maps every negative value to 0 (a fused ReLU)."""
    if np.dtype(dtype).kind not in "iu":
        return False
    lowest = np.iinfo(dtype).min
    if zero_point is None:
        return lowest == 0
    return bool(np.all(zero_point == lowest))


class Quantized:
    """Mixin of the builder: ConvInteger and QLinearConv nodes -> layer entries, via ``_conv_layer``."""

    def _quantized_conv(self, node: Any):
        if node.op_type == "QLinearConv":
            return self._qlinear_conv(node)
        x_q, w_name, x_zero, w_zero = (list(node.input) + ["", "", ""])[:4]
        q = self._weight(w_name, "weight")
        zero = self._quantization_constant(node, w_zero, "weight zero point", q.shape[0]) if w_zero else None
        source, x_scale = self._input_quantizer(node, x_q, x_zero)
        chain = self._scale_chain(node, x_scale)
        if chain is None:
            raise Skip("the scale of its weights is not a constant factor of the Mul after it "
                       "(ConvInteger -> Cast -> Mul); not analysed")
        ends, w_scale = chain
        scale = per_unit(w_scale, q.shape[0], axis_from_end=q.ndim - 2)
        if scale is None:
            raise Skip(f"the weight scale after it has shape {list(np.shape(w_scale))}, not one value per "
                       "output channel")
        entry = self._conv_layer(node, x_q, w_name, dequantize(q, scale, zero, axis=0), lambda units: None)
        entry.data_input = source  # the float input: its quantize -> conv -> rescale is one layer
        entry.ends = [node.output[0], *ends]
        self._quantized_bias(entry)
        entry.layer.quantization = _record("ConvInteger", q, w_scale, zero)
        return entry

    def _qlinear_conv(self, node: Any):
        x, x_scale, _, w_name, w_scale, w_zero, _, _, b_name = (list(node.input) + [""] * 9)[:9]
        q = self._weight(w_name, "weight")
        units = q.shape[0]
        scale = self._quantization_constant(node, w_scale, "weight scale", units)
        zero = self._quantization_constant(node, w_zero, "weight zero point", units) if w_zero else None
        bias = None
        if b_name:
            x_scale_value = self.const(x_scale)
            if x_scale_value is None or x_scale_value.size != 1:
                raise Skip(f"its input scale {x_scale!r} is not one constant, so its int32 bias cannot be "
                           "dequantized; not analysed")
            bias = self._bias(b_name, units) * float(x_scale_value.reshape(-1)[0]) * np.broadcast_to(
                np.asarray(scale, np.float64).reshape(-1), (units,))
        entry = self._conv_layer(node, x, w_name, dequantize(q, scale, zero, axis=0), lambda units: bias)
        entry.layer.quantization = _record("QLinearConv", q, scale, zero)
        return entry

    def _quantization_constant(self, node: Any, name: str, what: str, units: int) -> np.ndarray:
        """A scale or zero point of a quantized conv's weight: one value, or one per output channel."""
        value = self.const(name)
        if value is None:
            raise Skip(f"its {what} {name!r} is computed at run time, not a constant; not analysed")
        if value.size != 1 and (value.ndim != 1 or value.size != units):
            raise LoadError(f"{node.op_type} node {self._scoped(node, node_name(node))!r} has a {what} of shape "
                            f"{list(value.shape)}; ONNX allows one value or one per output channel ({units}): "
                            "the file is malformed, quantize the model again")
        return value

    def _input_quantizer(self, node: Any, x_q: str, x_zero: str) -> tuple[str, str | np.ndarray]:
        """(the float value the conv's input was quantized from, that quantizer's scale: a value name or a constant).

        The conv computes on ``(x_q - x_zero)``; that is the input times its scale only when
        ``x_zero`` is the zero point the same quantizer used.
        """
        quantizer = self.producer.get(x_q)
        if quantizer is not None and quantizer.domain in DEFAULT_DOMAINS:
            if quantizer.op_type == "DynamicQuantizeLinear" and x_zero == quantizer.output[2]:
                return quantizer.input[0], quantizer.output[1]
            if quantizer.op_type == "QuantizeLinear" and len(quantizer.input) > 1:
                scale = self.const(quantizer.input[1])
                same_zero = self._same_constant(x_zero, quantizer.input[2] if len(quantizer.input) > 2 else "")
                if scale is not None and scale.size == 1 and same_zero:
                    return quantizer.input[0], scale
        raise Skip("its input is not quantized by a DynamicQuantizeLinear or QuantizeLinear whose scale and zero "
                   "point it uses; not analysed")

    def _same_constant(self, a: str, b: str) -> bool:
        values = [np.zeros(1) if not name else self.const(name) for name in (a, b)]
        return all(v is not None for v in values) and np.array_equal(np.asarray(values[0], np.float64).reshape(-1),
                                                                     np.asarray(values[1], np.float64).reshape(-1))

    def _scale_chain(self, node: Any, x_scale: str | np.ndarray) -> tuple[list[str], np.ndarray] | None:
        """([Cast output, Mul output], the weight scale) after a ConvInteger, or None when not found."""
        cast = self._single_consumer(node.output[0])
        if cast is None or cast.op_type != "Cast":
            return None
        mul = self._single_consumer(cast.output[0])
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        factor = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        w_scale = self._weight_scale(factor, x_scale)
        return None if w_scale is None else ([cast.output[0], mul.output[0]], w_scale)

    def _weight_scale(self, factor: str, x_scale: str | np.ndarray) -> np.ndarray | None:
        """The weight's scale in the product ``factor = x_scale * w_scale``."""
        if isinstance(x_scale, np.ndarray):  # a constant input scale: the whole factor is constant
            total = self.const(factor)
            return None if total is None else np.asarray(total, np.float64) / float(x_scale.reshape(-1)[0])
        product = self.producer.get(factor)
        if product is None or product.op_type != "Mul" or x_scale not in product.input:
            return None
        other = product.input[1] if product.input[0] == x_scale else product.input[0]
        return self.const(other)

    def _quantized_bias(self, entry) -> None:
        """ConvInteger ... Mul + Add(one constant per channel) is one conv with a bias, folding or not."""
        out = entry.ends[-1]
        add = self._single_consumer(out)
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            return
        other = add.input[1] if add.input[0] == out else add.input[0]
        value = self.const(other)
        layer = entry.layer
        bias = None if value is None else per_unit(value, layer.out_channels, axis_from_end=layer.weight.ndim - 2)
        if bias is not None:
            layer.bias = bias
            entry.ends.append(add.output[0])

    def _weight_quantization(self, weight_name: str) -> dict[str, Any]:
        """``Layer.quantization`` of a conv whose weight comes from a DequantizeLinear (QDQ); {} otherwise."""
        name = weight_name
        for _ in range(64):
            node = self.producer.get(name)
            if node is None or node.op_type not in WEIGHT_ROUTE or name in self.flat.initializers:
                return {}
            if node.op_type == "DequantizeLinear":
                q, scale = self.const(node.input[0]), self.const(node.input[1])
                zero = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                return {} if q is None or scale is None else _record("DequantizeLinear", q, scale, zero)
            name = node.input[0]
        return {}


def _record(fmt: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> dict[str, Any]:
    per_channel = np.size(scale) > 1 or (zero is not None and np.size(zero) > 1)
    return {"format": fmt, "dtype": str(q.dtype), "per_channel": bool(per_channel)}
