"""A graph from a bare state_dict, with no model code.

Rules (documented in the README):

* A ``*.weight`` with 3, 4 or 5 dimensions is a conv1d/2d/3d layer, one with 2
  dimensions a linear layer, in file order.
* A BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``) whose
  module comes right after a layer in the file, with matching channels, is
  folded into it (eps = 1e-5, PyTorch's default; the file does not store it).
* What a state_dict cannot tell is left unknown (``None``): stride, padding,
  dilation, groups, the activation and the connectivity.
* Every other tensor group is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from hpa.fold import fold_batchnorm
from hpa.graph import ConvGraph, Layer, Skipped

_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
BN_EPS = 1e-5


def graph_from_state_dict(state: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray],
                          fold_bn: bool = True, source: dict[str, Any] | None = None) -> ConvGraph:
    groups = _group_by_module(state)
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    previous: Layer | None = None  # the layer whose module came just before, for BN folding
    for prefix, tensors in groups.items():
        weight = tensors.get("weight")
        if "running_mean" in tensors and "running_var" in tensors:
            _fold_or_list_batchnorm(prefix, tensors, previous, fold_bn, to_numpy, skipped)
            previous = None  # a second BatchNorm never folds into the same layer
            continue
        kind = _KINDS.get(len(getattr(weight, "shape", ()))) if weight is not None else None
        if kind is None or not _is_float(weight):
            skipped.append(Skipped(prefix, _why_not_a_layer(tensors)))
            previous = None
            continue
        bias = tensors.get("bias")
        layer = Layer(name=prefix, index=len(layers), kind=kind, weight=to_numpy(weight),
                      bias=None if bias is None else to_numpy(bias), activation=None, groups=None)
        if kind == "linear":
            layer.stride, layer.padding, layer.dilation, layer.groups = (), (), (), 1
        layers.append(layer)
        previous = layer
    info = {"connectivity": "unknown (bare state_dict: no model code)", "fold_bn": fold_bn, **(source or {})}
    return ConvGraph(layers, source=info, skipped=skipped)


def _fold_or_list_batchnorm(prefix, tensors, previous, fold_bn, to_numpy, skipped) -> None:
    channels = int(np.prod(getattr(tensors["running_mean"], "shape", (0,))))
    if not fold_bn:
        return
    if previous is None or previous.bn_folded or previous.out_channels != channels:
        skipped.append(Skipped(prefix, "BatchNorm that does not directly follow a conv or linear layer "
                                       "with the same channels in the file; not folded"))
        return
    gamma, beta = tensors.get("weight"), tensors.get("bias")
    previous.weight, previous.bias = fold_batchnorm(
        previous.weight, previous.bias, to_numpy(tensors["running_mean"]), to_numpy(tensors["running_var"]),
        None if gamma is None else to_numpy(gamma), None if beta is None else to_numpy(beta), eps=BN_EPS)
    previous.bn_folded = True


def _group_by_module(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix or leaf, {})[leaf] = value
    return groups


def _is_float(tensor: Any) -> bool:
    dtype = getattr(tensor, "dtype", None)
    return dtype is not None and ("float" in str(dtype) or "bfloat" in str(dtype))


def _why_not_a_layer(tensors: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k}{tuple(getattr(v, 'shape', ()))}" for k, v in tensors.items())
    if "weight" in tensors and len(getattr(tensors["weight"], "shape", ())) == 1:
        return f"1-D weight, a normalisation scale rather than an affine layer ({shapes})"
    return f"not a conv, linear or BatchNorm weight group ({shapes})"
