"""Put another state's numbers into a traced structure: no module, no forward pass, numpy only.

A graph traced once records in each ``Layer.params`` the state_dict keys its
numbers were read from (weight, bias, and the BatchNorm folded into it).
:func:`rebind` reads those keys from another state of the same architecture,
such as a training snapshot, and folds BatchNorm again with :mod:`hpa.fold`,
so the result equals a fresh trace of a module holding that state.  Per epoch
this costs what reading the tensors costs; a trace costs a forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from hpa.errors import LoadError
from hpa.fold import fold_batchnorm
from hpa.graph import ConvGraph, Layer

#: The roles ``Layer.params`` may name, besides the float "bn.eps".
ROLES = ("weight", "bias", "channel_bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
_RETRACE = "trace the model again instead of rebinding"


def rebind(graph: ConvGraph, state: Any) -> ConvGraph:
    """``graph`` with every layer's numbers read from ``state``; structure, names and skips are kept.

    ``state`` maps state_dict keys to arrays: numpy arrays, torch tensors,
    what ``safetensors.numpy.load_file`` returns, or a file opened with
    ``safetensors.safe_open(path, "numpy")`` (read key by key).  float32 and
    float64 numpy arrays are used as they are, without a copy, so do not
    change them in place while the graph is in use; torch tensors are copied,
    since they usually belong to a live module.

    Raises :class:`~hpa.errors.LoadError` naming the layer when one has no
    recorded tensors (its weight is computed in the forward pass: trace
    again), and naming the layer and key when a key is missing or its shape
    differs from the traced one.
    """
    read = _reader(state)
    layers = [_rebound(layer, read) for layer in graph]
    return ConvGraph(layers, source=dict(graph.source), skipped=list(graph.skipped),
                     input_shape=graph.input_shape)


def _rebound(layer: Layer, read: Callable[[str], Any]) -> Layer:
    params = layer.params
    if not params:
        raise LoadError(f"layer {layer.name!r} records no state_dict keys (its weight is computed in the "
                        f"forward pass, or its loader does not record them); {_RETRACE}")
    unknown = [role for role in params if role not in ROLES and role != "bn.eps"]
    if unknown:
        raise LoadError(f"layer {layer.name!r} names a tensor role rebind does not know ({unknown[0]!r}); "
                        f"{_RETRACE}")
    out = (layer.out_channels,)
    tensor = _tensor_reader(layer, read)
    weight = tensor("weight", layer.weight.shape)
    bias = tensor("bias", out) if "bias" in params else None
    channel_bias = tensor("channel_bias", layer.channel_bias.shape) if "channel_bias" in params else None
    if layer.bn_folded:
        weight, bias = _refold(layer, weight, bias, tensor)
    return dataclasses.replace(layer, weight=weight, bias=bias, channel_bias=channel_bias, params=dict(params),
                               via=dict(layer.via), activation_params=dict(layer.activation_params))


def _refold(layer: Layer, weight: np.ndarray, bias: np.ndarray | None, tensor) -> tuple[np.ndarray, np.ndarray]:
    params = layer.params
    if "bn.running_mean" not in params or "bn.running_var" not in params:
        raise LoadError(f"layer {layer.name!r} has a folded BatchNorm whose running statistics it does not "
                        f"name; {_RETRACE}")
    out = (layer.out_channels,)
    gamma = tensor("bn.weight", out) if "bn.weight" in params else None
    beta = tensor("bn.bias", out) if "bn.bias" in params else None
    return fold_batchnorm(weight, bias, tensor("bn.running_mean", out), tensor("bn.running_var", out), gamma,
                          beta, eps=float(params.get("bn.eps", 1e-5)), out_axis=1 if layer.transposed else 0,
                          groups=layer.groups or 1)


def _tensor_reader(layer: Layer, read: Callable[[str], Any]):
    """role, expected shape -> the array of ``layer``'s key for that role, checked."""

    def tensor(role: str, shape: tuple[int, ...]) -> np.ndarray:
        key = layer.params[role]
        try:
            value = read(key)
        except KeyError:
            raise LoadError(f"the state has no {key!r}, the {role} of layer {layer.name!r}; rebind a state of "
                            "the same architecture") from None
        array = _as_array(value)
        if tuple(array.shape) != tuple(shape):
            raise LoadError(f"{key!r} is {tuple(array.shape)} in the state, but layer {layer.name!r} needs "
                            f"{tuple(shape)} for its {role}; rebind a state of the same architecture")
        return array

    return tensor


def _reader(state: Any) -> Callable[[str], Any]:
    """key -> value, raising KeyError for a missing key, for a mapping or an open safetensors file."""
    if hasattr(state, "get_tensor") and hasattr(state, "keys"):
        keys = set(state.keys())

        def read_file(key: str):
            if key not in keys:
                raise KeyError(key)
            return state.get_tensor(key)

        return read_file
    if isinstance(state, Mapping) or (hasattr(state, "keys") and hasattr(state, "__getitem__")):
        return state.__getitem__
    raise LoadError(f"cannot rebind from a {type(state).__name__}; give a mapping of state_dict keys to "
                    "arrays or an open safetensors file")


def _as_array(value: Any) -> np.ndarray:
    """A float32/float64 numpy array, as the tracer makes them (other dtypes become float32)."""
    if type(value).__module__.split(".")[0] == "torch":
        return _from_tensor(value)
    array = np.asarray(value)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def _from_tensor(tensor) -> np.ndarray:
    import torch  # only reached with torch tensors in hand, so torch is already imported

    tensor = tensor.detach()
    dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    converted = tensor.to(device="cpu", dtype=dtype)
    array = converted.numpy()
    return array.copy() if converted is tensor else array  # never a view of the caller's tensor
