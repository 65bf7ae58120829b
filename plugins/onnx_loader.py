"""The ``onnx:PATH`` loader (a plain ``*.onnx`` path works too).

Reads the model with the ``onnx`` package, resolves every conv, transposed
conv and linear layer's weights whatever route they take into the node, folds
BatchNormalization and per-channel Mul/Add affines, and traces predecessors
through the graph.  The work is in :mod:`hpa.backends.onnx_graph`; onnx is
imported only when a model is loaded, so ``hpa --help`` stays fast.
"""

from __future__ import annotations

from hpa.hookspecs import hookimpl
from hpa.registry import Loader, LoadOptions


def load(name: str, options: LoadOptions):
    from hpa.backends.onnx_graph import load_onnx

    return load_onnx(name, options)


@hookimpl
def register_loaders(register):
    register(Loader(
        prefix="onnx",
        load=load,
        suffixes=(".onnx",),
        description="ONNX model files (onnx:PATH or PATH.onnx); external data is memory-mapped",
    ))
