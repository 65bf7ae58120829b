"""Folding what follows a layer into it: BatchNormalization, and per-channel Mul/Div/Add/Sub affines.

Only a node that is the layer output's single consumer is folded, so a value
that other nodes also read is never changed behind their back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpa.backends.onnx.common import DEFAULT_DOMAINS, attributes, per_unit
from hpa.backends.onnx.layers import Entry
from hpa.fold import fold_affine, fold_batchnorm
from hpa.graph import Layer


class Folding:
    """Mixin of the builder: ``_fold_next(entry)`` folds one node after the layer, or returns None."""

    def _fold_next(self, entry: Entry) -> Any | None:
        out = entry.ends[-1]
        node = self._single_consumer(out)
        if node is None or node.domain not in DEFAULT_DOMAINS:
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
            eps = float(attributes(node).get("epsilon", 1e-5))
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
        values = per_unit(value, layer.out_channels,
                          axis_from_end=0 if layer.kind == "linear" else layer.weight.ndim - 2)
        if values is None:
            return False
        op = node.op_type
        if op == "Div" and not first:
            return False  # c / y is not affine
        if op == "Mul":
            scale, shift = values, None
        elif op == "Div":
            if np.any(values == 0):
                return False
            scale, shift = 1.0 / values, None
        elif op == "Add":
            scale, shift = None, values
        else:  # Sub: y - c, or c - y
            scale, shift = (None, -values) if first else (-np.ones_like(values), values)
        apply_affine(layer, scale, shift)
        if scale is not None:
            layer.bn_folded = True
        return True


def apply_affine(layer: Layer, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
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
