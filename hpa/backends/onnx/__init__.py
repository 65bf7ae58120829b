"""The ONNX reader, one module per step (the walk-through is in :mod:`hpa.backends.onnx.builder`).

* ``file``: read a .onnx file with its large tensors memory-mapped;
* ``runtime``: run a model with onnxruntime (checks and benchmarks);
* ``scopes``: inline local functions, splice If/Loop/Scan subgraphs into one node list;
* ``shapes``: ONNX shape inference, with ``--input-size``;
* ``constants``: the value of any tensor the file determines;
* ``layers``: Conv/ConvTranspose/Gemm/MatMul nodes -> layers, padding, naming;
* ``folding``: BatchNormalization and per-channel affines folded into a layer;
* ``activations``: the nonlinearity after a layer, multi-node patterns included;
* ``predecessors``: which layers feed each layer, and through which ops;
* ``builder``: ``load_onnx``, which runs the steps.

Nothing is imported here, so ``import hpa.backends.onnx.runtime`` stays light.
"""
