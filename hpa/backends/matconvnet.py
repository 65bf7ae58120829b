"""Read MatConvNet model files (``.mat``) into a :class:`~hpa.graph.ConvGraph`.

Both formats of the MatConvNet model zoo, in their old (beta16) and new variants:

* **SimpleNN**: ``layers`` is a cell array of structs run in order (``type``
  conv, convt, relu, pool, bnorm, lrn/normalize, dropout, softmax, ...); weights
  are in ``weights`` (a cell) or, in old files, in ``filters``/``biases``.
* **DagNN**: ``layers`` is a struct array (``type`` dagnn.Conv, dagnn.ReLU, ...)
  wired by the variable names in ``inputs``/``outputs``; hyper-parameters are in
  ``block`` and weights in the net's ``params`` struct array, found by ``name``.

Image size comes from ``meta.normalization.imageSize`` (or the old top-level
``normalization``, or ``meta.inputs``); a whole-network ``net`` struct wrapper is
unwrapped.  Fields are read by name and missing ones take MatConvNet's defaults.

Conventions converted here:

* weights are H x W x Cin x Cout with trailing singleton dimensions dropped by
  MATLAB; they become torch's (Cout, Cin, H, W).  MatConvNet convolution is a
  cross-correlation like torch's, so kernels are not flipped.
* ``pad`` is ``[top bottom left right]`` or a scalar -> (begin, end) pairs;
  ``stride``/``dilate`` are scalars or pairs; groups are Cin / the weight's Cin.
* ``bnorm`` moments are ``[mean, sigma]`` with sigma = sqrt(var + eps) already
  applied, and MatConvNet computes gamma * (x - mean) / sigma + beta, so the fold
  (STATISTICS.md §0) uses scale = gamma / sigma exactly.

Memory: scipy materialises every array once.  Conv weights are permuted in place
into C order, so the graph shares that memory; folded layers replace theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hpa.errors import LoadError, OptionError
from hpa.files import check_model_file
from hpa.fold import fold_affine, fold_batchnorm
from hpa.graph import INPUT, ConvGraph, Layer, Skipped

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: SimpleNN layer types -> the normalized op type used below.
SIMPLENN_TYPES = {
    "conv": "conv", "convt": "convt", "pool": "pool", "relu": "relu", "sigmoid": "sigmoid",
    "tanh": "tanh", "bnorm": "bnorm", "lrn": "lrn", "normalize": "lrn", "dropout": "dropout",
    "softmax": "softmax", "softmaxloss": "loss", "loss": "loss", "pdist": "loss",
    "noffset": "noffset", "spnorm": "spnorm",
}
#: DagNN block classes -> the normalized op type.
DAGNN_TYPES = {
    "dagnn.Conv": "conv", "dagnn.ConvTranspose": "convt", "dagnn.ReLU": "relu",
    "dagnn.Sigmoid": "sigmoid", "dagnn.Tanh": "tanh", "dagnn.BatchNorm": "bnorm",
    "dagnn.Pooling": "pool", "dagnn.LRN": "lrn", "dagnn.DropOut": "dropout", "dagnn.Concat": "concat",
    "dagnn.Sum": "sum", "dagnn.SoftMax": "softmax", "dagnn.Loss": "loss", "dagnn.PDist": "loss",
    "dagnn.Scale": "scale", "dagnn.NormOffset": "noffset", "dagnn.SpatialNorm": "spnorm",
    "dagnn.Crop": "crop",
}
#: Normalized op type -> the op name recorded in ``Layer.via``.  These are the names
#: the torch tracer records for the same operations, so graphs compare across backends.
VIA_NAMES = {
    "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "bnorm": "batch_norm",
    "lrn": "local_response_norm", "dropout": "dropout", "concat": "cat", "sum": "add",
    "softmax": "softmax", "loss": "loss", "scale": "mul", "noffset": "noffset", "spnorm": "spnorm",
    "crop": "crop",
}
#: Ops that keep their input's shape.
_SAME_SHAPE = {"relu", "sigmoid", "tanh", "bnorm", "lrn", "dropout", "softmax", "scale", "noffset", "spnorm"}
_CHUNK = 1 << 22  # elements permuted at a time when reordering weights in place


@dataclass(eq=False)
class _Op:
    """One MatConvNet layer, whatever the format."""

    name: str
    type: str  # normalized type, or "" when unknown
    raw_type: str  # the type string in the file
    inputs: list[str]
    outputs: list[str]
    attrs: Any  # the struct holding hyper-parameters (SimpleNN: the layer; DagNN: its block)
    params: list[Any] = field(default_factory=list)  # weight arrays in MatConvNet order
    problem: str | None = None  # why the op cannot be read (it is then skipped)


@dataclass(eq=False)
class _Node:
    op: str  # "input", "layer", or a via name
    inputs: list[_Node] = field(default_factory=list)
    layer: Layer | None = None
    kind: str = ""  # the normalized op type
    attrs: Any = None


@dataclass
class _Net:
    format: str  # "simplenn" | "dagnn"
    variant: str  # "beta16" (top-level normalization, filters/biases) | "new"
    ops: list[_Op]
    image_size: tuple[int | None, int | None, int | None] | None  # (C, H, W) from the file
    wrapped: bool  # the file had a top-level ``net`` struct
    inputs: list[str] | None = None  # names of the image inputs when the file says


