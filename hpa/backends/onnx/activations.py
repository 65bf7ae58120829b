"""The nonlinearity after a layer, including patterns that span several nodes.

Single-node activations map ONNX op types to hpa's canonical names
(:data:`hpa.graph.ACTIVATIONS`); ``x * sigmoid(x)`` (silu), ``x * hardsigmoid(x)``
(hardswish) and the erf form of GELU are recognised across their nodes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpa.backends.onnx.common import DEFAULT_DOMAINS, attributes, text
from hpa.backends.onnx.quantized import QUANTIZERS, clips_at_zero
from hpa.graph import INFERENCE_IDENTITIES

# ONNX op -> canonical activation name (single-node activations).
ACTIVATION_OPS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Tanh": "tanh", "Sigmoid": "sigmoid",
    "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid", "Elu": "elu", "Selu": "selu", "Celu": "celu",
    "Softplus": "softplus", "Softsign": "softsign", "Mish": "mish", "Gelu": "gelu",
    "ThresholdedRelu": "threshold",
}
# ONNX ops that pass a tensor on unchanged at inference -> canonical name.
_IDENTITY_OPS = {"Identity": "identity", "Dropout": "dropout"}
#: Ops an activation search passes through, as the torch tracer passes dropout.
TRANSPARENT = frozenset(op for op, name in _IDENTITY_OPS.items() if name in INFERENCE_IDENTITIES)


class Activations:
    """Mixin of the builder: ``_activation(value)`` finds the nonlinearity applied to ``value``."""

    def _activation(self, value: str) -> tuple[str, dict[str, float], list[Any], str]:
        """The nonlinearity applied to ``value``: (name, params, nodes it spans, its output)."""
        passable = set(TRANSPARENT) | ({"BatchNormalization"} if not self.options.fold_bn else set())
        if self._fused_relu(self.producer.get(value)):  # a QLinearConv's output quantizer clips at zero
            return "relu", {}, [], value
        while True:
            consumers = self.consumers.get(value, [])
            if len(consumers) == 2:
                found = self._two_branch_activation(value, consumers)
                if found is not None:
                    return found
            node = self._single_consumer(value)
            if node is None or node.domain not in DEFAULT_DOMAINS:
                return "none", {}, [], value
            if node.op_type in QUANTIZERS and node.input[0] == value and self._fused_relu(node):
                return "relu", {}, [node], node.output[0]
            if (node.op_type in passable or node.op_type in QUANTIZERS) and node.input[0] == value:
                value = node.output[0]
                continue
            found = self._simple_activation(node)
            if found is None:
                return "none", {}, [], value
            return found[0], found[1], [node], node.output[0]

    def _fused_relu(self, node: Any | None) -> bool:
        """A QuantizeLinear or QLinearConv whose output zero point is its type's minimum: every negative
        value becomes 0, the ReLU onnxruntime's quantizer fuses into the quantization."""
        position = {"QuantizeLinear": 2, "QLinearConv": 7}.get(getattr(node, "op_type", None))
        if position is None or node.domain not in DEFAULT_DOMAINS:
            return False
        if len(node.input) <= position or not node.input[position]:
            return node.op_type == "QuantizeLinear" and "output_dtype" not in attributes(node)  # uint8, zero 0
        zero = self.const(node.input[position])
        return zero is not None and clips_at_zero(zero, zero.dtype)

    def _simple_activation(self, node: Any) -> tuple[str, dict[str, float]] | None:
        op = node.op_type
        attrs = attributes(node)
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
        name = ACTIVATION_OPS.get(op)
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
        if name == "gelu" and text(attrs.get("approximate", "none")) == "tanh":
            return name, {"approximate_tanh": 1.0}
        return name, {}

    def _two_branch_activation(self, value: str, consumers: list[Any]):
        """x * sigmoid(x) (silu), x * hardsigmoid(x) (hardswish), or the erf form of gelu."""
        if value in self.flat.outputs:
            return None
        for gate, mul in (consumers, consumers[::-1]):
            if mul.op_type != "Mul" or set(mul.input) != {value, gate.output[0]} or len(gate.input) < 1:
                if mul.op_type == "Mul" and value in mul.input:
                    found = self._erf_gelu(value, gate, mul)
                    if found is not None:
                        return found
                continue
            attrs = attributes(gate)
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
