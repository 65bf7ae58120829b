"""The ``onnx:PATH`` loader (a plain ``*.onnx`` path works too).

Reads the model with the ``onnx`` package, resolves every conv, transposed
conv and linear layer's weights whatever route they take into the node, folds
BatchNormalization and per-channel Mul/Add affines, and traces predecessors
through the graph, inside control-flow subgraphs and local functions too.  The
work is in the :mod:`hpa.backends.onnx` package; onnx is
imported only when a model is loaded, so ``hpa --help`` stays fast.
"""

from __future__ import annotations

from hpa import LoadOptions, Loader, hookimpl
from hpa import sniff


def load(name: str, options: LoadOptions):
    from hpa.backends.onnx.builder import load_onnx

    return load_onnx(name, options)


@hookimpl
def register_loaders(register):
    register(Loader(
        prefix="onnx",
        load=load,
        suffixes=(".onnx",),
        sniff=sniff.is_onnx,  # files with no or an unknown suffix, by content
        description="ONNX model files (onnx:PATH or PATH.onnx); external data is memory-mapped",
    ))
