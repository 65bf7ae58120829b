"""An example hpa plugin: one statistic (``filter_norms``) and one loader (``npz``).

hpa finds this module through the ``hpa`` entry-point group in pyproject.toml
and calls the two ``@hpa.hookimpl`` functions below, each of which registers
one thing.  A statistic reads only the :class:`hpa.ConvGraph`; a loader builds
one.  Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np

import hpa
from hpa.files import check_model_file

KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}  # weight dimensions -> layer kind


# -- the statistic ------------------------------------------------------------------

@hpa.hookimpl
def register_statistics(register):
    register(hpa.Statistic(
        name="filter_norms",
        compute=filter_norms,
        description="L2 norm of every filter; per layer mean, min and max",
        columns=lambda values: {"mean norm": _fmt(values["mean"]), "max norm": _fmt(values["max"])},
    ))


def filter_norms(graph: hpa.ConvGraph, context: hpa.StatisticContext) -> hpa.StatisticResult:
    result = hpa.StatisticResult()
    for layer in graph:
        if layer.kind == "linear" and not context.options.get("with_linear"):
            result.skipped.append(hpa.Skipped(layer.name, "linear layer; pass --with-linear", "filter_norms"))
        elif layer.transposed:
            result.skipped.append(hpa.Skipped(layer.name, "transposed conv; not supported by this example",
                                              "filter_norms"))
        else:
            result.layers[layer.name] = _layer_norms(layer.weight, layer.name, result.damaged)
    return result


def _layer_norms(weight, name: str, damaged: list[str]) -> dict:
    rows = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)  # one filter per row
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    finite = norms[np.isfinite(norms)]
    if len(finite) < len(norms):
        damaged.append(f"{name}: {len(norms) - len(finite)} filters hold NaN or Inf weights")
    if not len(finite):
        return {"mean": None, "min": None, "max": None, "n_filters": len(norms), "norms": [None] * len(norms)}
    return {"mean": float(finite.mean()), "min": float(finite.min()), "max": float(finite.max()),
            "n_filters": len(norms), "norms": [float(v) if np.isfinite(v) else None for v in norms]}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


# -- the loader ---------------------------------------------------------------------

@hpa.hookimpl
def register_loaders(register):
    register(hpa.Loader(
        prefix="npz",
        load=load_npz,
        suffixes=(".npz",),  # plain paths ending in .npz come here too
        description="NumPy .npz of '<layer>.weight' (and '<layer>.bias') arrays, in file order",
    ))


def load_npz(path: str, options: hpa.LoadOptions) -> hpa.ConvGraph:
    """Each ``<layer>.weight`` array is one layer, in file order; everything else is skipped.

    An .npz holds no strides, padding, activations or connectivity, so those
    stay unknown (None) rather than guessed.
    """
    arrays = _read(path)
    layers, skipped = [], []
    for key, weight in arrays.items():
        name, _, leaf = key.rpartition(".")
        if leaf == "bias" and f"{name}.weight" in arrays:
            continue  # read together with its weight
        kind = KINDS.get(weight.ndim) if leaf == "weight" else None
        if kind is None or not np.issubdtype(weight.dtype, np.floating):
            skipped.append(hpa.Skipped(key, f"not a '<layer>.weight' array of 2 to 5 dims ({weight.shape})"))
            continue
        layer = hpa.Layer(name=name, index=len(layers), kind=kind, weight=weight,
                          bias=arrays.get(f"{name}.bias"), activation=None, groups=None)
        if kind == "linear":
            layer.stride, layer.padding, layer.dilation, layer.groups = (), (), (), 1
        layers.append(layer)
    return hpa.ConvGraph(layers, source={"connectivity": "unknown (.npz holds weights only)"}, skipped=skipped)


def _read(path: str) -> dict[str, np.ndarray]:
    checked = check_model_file(path, ".npz file")
    try:
        with np.load(checked, allow_pickle=False) as archive:  # never unpickle
            return {key: archive[key] for key in archive.files}
    except Exception as exc:  # zipfile, pickle and format errors alike
        raise hpa.LoadError(f"{path} is not a readable .npz archive of arrays ({type(exc).__name__}: {exc})") from exc
