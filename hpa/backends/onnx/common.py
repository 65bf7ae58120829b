"""Small helpers every part of the ONNX reader uses: node attributes, names, shapes, per-unit constants."""

from __future__ import annotations

from typing import Any

import numpy as np

#: The domains of the standard operator set.
DEFAULT_DOMAINS = ("", "ai.onnx")
#: Ops a weight passes through on its way from an initializer (for naming the layer after it).
WEIGHT_ROUTE = ("Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "DequantizeLinear", "Flatten")

Shape = tuple  # of int | None per dimension, batch included


class Skip(Exception):
    """This node is a layer hpa cannot analyse; the message says why."""


def attributes(node: Any) -> dict[str, Any]:
    """A node's attributes as Python values (graph-valued ones left out)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type not in (5, 10)}


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def node_name(node: Any) -> str:
    return node.name or next((o for o in node.output if o), node.op_type)


def drop_batch(shape: Shape | None) -> tuple[int, ...] | None:
    if shape is None or len(shape) < 1 or None in shape[1:]:
        return None
    return tuple(int(s) for s in shape[1:])


def as_float(weight: np.ndarray) -> np.ndarray:
    """float32/float64 as they are (views stay views); other types as float32."""
    if weight.dtype in (np.float32, np.float64):
        return weight
    return weight.astype(np.float32)


def per_unit(value: np.ndarray, units: int, axis_from_end: int | None = None) -> np.ndarray | None:
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
