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
  (docs/statistics.md §0) uses scale = gamma / sigma exactly.

Memory: scipy materialises every array once.  Conv weights are handed on as
(Cout, Cin, H, W) views of that memory; folded layers replace theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hpa.dataflow import predecessors
from hpa.errors import LoadError, OptionError
from hpa.files import check_model_file
from hpa.fold import fold_affine, fold_batchnorm
from hpa.graph import (ACTIVATIONS, INFERENCE_IDENTITIES, INPUT, ConvGraph, Layer, Skipped, conv_output_size,
                       unique_name)

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
#: Op types that pass their input on unchanged at inference (dropout).
_IDENTITIES = frozenset(t for t, name in VIA_NAMES.items() if name in INFERENCE_IDENTITIES)
#: Ops that keep their input's shape.
_SAME_SHAPE = {"relu", "sigmoid", "tanh", "bnorm", "lrn", "dropout", "softmax", "scale", "noffset", "spnorm"}


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


# -- entry point ---------------------------------------------------------------------------

def load_matconvnet(path: str | os.PathLike, options: Any) -> ConvGraph:
    """Read the MatConvNet model at ``path`` (SimpleNN or DagNN) as a ConvGraph."""
    if options.weights not in (None, ""):
        raise OptionError("the matconvnet loader reads its weights from the .mat file; --weights does not apply "
                          "(to compare against an initial snapshot, pass --init PATH.mat)")
    file = check_model_file(path, "MatConvNet file")
    net = _parse(_read_mat(file), file)
    image = _input_size(options.input_size, net)
    layers, skipped, image = _build(net, image, options.fold_bn)
    source = {"path": str(file), "format": net.format, "variant": net.variant, "net_wrapper": net.wrapped}
    return ConvGraph(layers, source=source, skipped=skipped, input_shape=image)


# -- reading the file ------------------------------------------------------------------------

def _read_mat(file: Path) -> dict[str, Any]:
    with open(file, "rb") as handle:
        head = handle.read(520)
    if head.startswith(b"MATLAB 7.3") or head.startswith(_HDF5_SIGNATURE) or head[512:520] == _HDF5_SIGNATURE:
        raise LoadError(f"{file} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in MATLAB "
                        f"as a v7 file: net = load('{file.name}'); save('{file.stem}-v7.mat', '-struct', 'net', '-v7')")
    if not head.startswith(b"MATLAB 5.0"):
        shown = head[:16].decode("latin1").encode("unicode_escape").decode("ascii")
        raise LoadError(f"{file} is not a MATLAB .mat file (it starts with '{shown}'); MatConvNet models are .mat "
                        "files saved by MATLAB (v6 or v7)")
    from scipy.io import loadmat
    try:
        return loadmat(file, squeeze_me=False, struct_as_record=False, mat_dtype=False)
    except MemoryError:
        raise LoadError(f"{file} does not fit in memory ({file.stat().st_size / 1e6:.0f} MB)") from None
    except Exception as exc:
        raise LoadError(f"{file} could not be read as a MATLAB file ({type(exc).__name__}: {_first_line(exc)}); "
                        "it may be truncated or damaged: download or save it again") from exc


def _parse(mat: dict[str, Any], file: Path) -> _Net:
    variables = {k: v for k, v in mat.items() if not k.startswith("__")}
    _refuse_objects(variables, file)
    wrapped = False
    top: Any = variables
    if "layers" not in variables and "net" in variables:
        top, wrapped = _struct(variables["net"]), True
        _refuse_objects({"net": top}, file)
    layers = _get(top, "layers")
    if layers is None:
        found = ", ".join(sorted(variables)) or "nothing"
        raise LoadError(f"{file} holds no MatConvNet network: there is no 'layers' variable (found: {found})")
    if isinstance(layers, str) and layers.startswith("Read error"):
        raise LoadError(f"{file}: scipy could not read 'layers' ({layers}); re-save the file in MATLAB with -v7")
    entries = _items(layers)
    if not entries:
        raise LoadError(f"{file} holds a MatConvNet network with no layers")
    _refuse_objects({"layers": entries[0]}, file)
    dagnn = _is_dagnn(entries)
    meta = _struct(_get(top, "meta"))
    old_norm = _get(top, "normalization")
    variant = "beta16" if meta is None and old_norm is not None else "new"
    if dagnn:
        ops = _dagnn_ops(entries, _get(top, "params"))
        inputs = [_text(_get(s, "name")) for s in _items(_get(meta, "inputs"))] or None
    else:
        ops = _simplenn_ops(entries)
        inputs = None
        if any(_has(_struct(e), "filters") for e in entries) and variant == "new" and meta is None:
            variant = "beta16"
    norm = _struct(_get(meta, "normalization")) if meta is not None else _struct(old_norm)
    return _Net("dagnn" if dagnn else "simplenn", variant, ops, _image_size(norm, meta), wrapped, inputs)


def _refuse_objects(variables: dict[str, Any], file: Path) -> None:
    """MATLAB objects (MCOS) saved without saveobj reach scipy as opaque blobs: say how to fix that."""
    for name, value in variables.items():
        kind = type(value).__name__
        if kind == "MatlabOpaque" or (kind == "ndarray" and value.dtype.names == ("s0", "s1", "s2", "arr")):
            record = value.reshape(-1)[0] if value.size else None
            var = _bytes_text(record["s0"]) if record is not None else name
            cls = _bytes_text(record["s2"]) if record is not None else "an object"
            raise LoadError(
                f"{file} stores '{var}' as a MATLAB object ({cls}), which scipy cannot read; in MATLAB save its "
                f"struct form instead: s = {var}.saveobj(); save('{file.stem}-struct.mat', '-struct', 's', '-v7')")
        if kind == "MatlabObject":
            cls = getattr(value, "classname", "an object")
            raise LoadError(f"{file} stores '{name}' as a MATLAB object ({cls}); in MATLAB convert it to a struct "
                            f"(s = struct({name}) or {name}.saveobj()) and save that with -v7")


def _is_dagnn(entries: list[Any]) -> bool:
    first = _struct(entries[0])
    return _text(_get(first, "type")).startswith("dagnn.") or _has(first, "block") or _has(first, "inputs")


def _simplenn_ops(entries: list[Any]) -> list[_Op]:
    ops = []
    for i, entry in enumerate(entries):
        layer = _struct(entry)
        raw = _text(_get(layer, "type"))
        name = _text(_get(layer, "name")) or f"layer{i + 1}"
        op = _Op(name, SIMPLENN_TYPES.get(raw.lower(), ""), raw, [f"x{i}"], [f"x{i + 1}"], layer)
        if not _is_struct(layer):
            op.problem = (f"the layer is not a struct but {_describe(entry)}; every entry of the file's "
                          "layers must be a layer struct with a 'type' field (re-save the network from MATLAB)")
        elif op.type in ("conv", "convt"):
            op.params = _simplenn_weights(layer, ("filters", "biases"))
        elif op.type == "bnorm":
            op.params = _simplenn_weights(layer, ("filters", "biases", "moments"))
        ops.append(op)
    return ops


def _simplenn_weights(layer: Any, old_names: tuple[str, ...]) -> list[Any]:
    """New files keep weights in a ``weights`` cell; beta16-era files in named fields."""
    cell = _get(layer, "weights")
    if cell is not None and not _is_empty(cell):
        values = _take_cells(cell)
        if "moments" in old_names and len(values) < 3 and _has(layer, "moments"):
            values.append(_get(layer, "moments"))
        return values
    return [_get(layer, name) for name in old_names]


def _dagnn_ops(entries: list[Any], params: Any) -> list[_Op]:
    by_name: dict[str, Any] = {}
    for record in _items(params):
        record = _struct(record)
        by_name[_text(_get(record, "name"))] = record
    layers = [_struct(entry) for entry in entries]
    uses: dict[str, int] = {}
    for layer in layers:
        for pname in _texts(_get(layer, "params")):
            uses[pname] = uses.get(pname, 0) + 1
    ops = []
    for i, layer in enumerate(layers):
        raw = _text(_get(layer, "type"))
        name = _text(_get(layer, "name")) or f"layer{i + 1}"
        op = _Op(name, DAGNN_TYPES.get(raw, ""), raw, _texts(_get(layer, "inputs")),
                 _texts(_get(layer, "outputs")), _struct(_get(layer, "block")))
        missing = []
        for pname in _texts(_get(layer, "params")):
            record = by_name.get(pname)
            if record is None:
                missing.append(pname)
                op.params.append(None)
                continue
            uses[pname] -= 1
            if uses[pname]:  # a shared param (siamese nets): later users need their own copy
                value = _array(_get(record, "value"))
                op.params.append(None if value is None else value.copy(order="K"))
            else:
                op.params.append(_take(record, "value"))
        if missing and op.type in ("conv", "convt"):
            op.problem = f"its params {', '.join(missing)} are not in the file's params list"
        ops.append(op)
    return ops


def _image_size(norm: Any, meta: Any) -> tuple[int | None, int | None, int | None] | None:
    size = _numbers(_get(norm, "imageSize"))
    if size is None or size.size < 2:
        inputs = _items(_get(meta, "inputs"))
        size = _numbers(_get(_struct(inputs[0]), "size")) if inputs else None
    if size is None or size.size < 2:
        return None
    channels = int(size[2]) if size.size > 2 else None
    return channels, int(size[0]), int(size[1])


def _input_size(option: tuple[int, ...] | None, net: _Net):
    """An explicit --input-size wins over the file's imageSize (it may ask for another resolution)."""
    if option is None:
        return net.image_size
    if len(option) != 3:
        raise OptionError(f"MatConvNet networks are 2-D: --input-size must be C,H,W, not {','.join(map(str, option))}")
    return tuple(option)


# -- building the graph ------------------------------------------------------------------

def _build(net: _Net, image, fold_bn: bool):
    order = _execution_order(net.ops)
    produced = {v for op in order for v in op.outputs}
    consumers: dict[str, list[_Op]] = {}
    for op in order:
        for var in op.inputs:
            consumers.setdefault(var, []).append(op)
    net_inputs = [v for op in order for v in op.inputs if v not in produced]
    image_inputs = _image_inputs(net, net_inputs, consumers)
    first_conv = next((op for op in order if op.type in ("conv", "convt") and not op.problem), None)
    if (image is None or image[0] is None) and first_conv is not None:
        image = (_conv_in_channels(first_conv),) + (tuple(image[1:]) if image is not None else (None, None))
    shapes: dict[str, tuple] = {}
    nodes: dict[str, _Node] = {}
    for var in dict.fromkeys(net_inputs):
        nodes[var] = _Node("input")
        if var in image_inputs:
            shapes[var] = tuple(image) if image is not None else (None, None, None)
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    ends: dict[int, str] = {}  # id(layer) -> the variable carrying its (folded) output
    names: dict[str, int] = {}
    for op in order:
        op.name = unique_name(op.name, names)
        _run_op(op, nodes, shapes, consumers, layers, skipped, ends, fold_bn)
    for layer in layers:
        layer.activation, layer.activation_params = _activation_after(ends[id(layer)], consumers, fold_bn)
        layer.predecessors, layer.via = _predecessors(layer._mcn_node)  # type: ignore[attr-defined]
        del layer._mcn_node  # type: ignore[attr-defined]
    full = image if image is not None and None not in image else None
    return layers, skipped, full


def _run_op(op, nodes, shapes, consumers, layers, skipped, ends, fold_bn) -> None:
    sources = [nodes.get(v) or _Node("missing") for v in op.inputs]
    in_shapes = [shapes.get(v, (None, None, None)) for v in op.inputs]
    if op.problem is None and op.type in ("conv", "convt"):
        made = _conv_layer(op, in_shapes[0] if in_shapes else (None, None, None), len(layers))
        if isinstance(made, str):
            op.problem = made
        else:
            layer, out_shape = made
            node = _Node("layer", sources[:1], layer=layer, kind=op.type)
            layer._mcn_node = node  # type: ignore[attr-defined]
            layers.append(layer)
            ends[id(layer)] = _publish(op, node, out_shape, nodes, shapes)
            return
    if op.problem is None and op.type in ("bnorm", "scale") and fold_bn and _fold(op, sources, consumers, skipped):
        layer = sources[0].layer
        ends[id(layer)] = _publish(op, sources[0], in_shapes[0], nodes, shapes)
        return
    if op.problem is not None or not op.type:
        skipped.append(Skipped(op.name, _skip_reason(op)))
    if op.type == "bnorm" and fold_bn and _bnorm_values(op, None) is None:
        skipped.append(Skipped(op.name, "bnorm layer has no moments (MatConvNet then normalises with batch "
                                        "statistics); it is not folded"))
    node = _Node(_via_name(op), sources, kind=op.type, attrs=op.attrs)
    _publish(op, node, _op_shape(op, in_shapes), nodes, shapes)


def _publish(op: _Op, node: _Node, shape, nodes, shapes) -> str:
    for var in op.outputs:
        nodes[var] = node
        shapes[var] = shape if shape is not None else (None, None, None)
    return op.outputs[0] if op.outputs else ""


def _skip_reason(op: _Op) -> str:
    if op.problem:
        return f"{op.raw_type or 'untyped'} layer skipped: {op.problem}"
    if op.raw_type == "custom":
        return ("custom layer (MATLAB function handles) cannot be run outside MATLAB; passed through as an "
                "opaque op, so shapes after it are unknown")
    return (f"unknown MatConvNet layer type '{op.raw_type}'; passed through as an opaque op, so shapes after "
            "it are unknown")


def _execution_order(ops: list[_Op]) -> list[_Op]:
    """A topological order that keeps file order where it can (MatConvNet files are nearly always ordered)."""
    produced = {v for op in ops for v in op.outputs}
    ready = {v for op in ops for v in op.inputs if v not in produced}
    pending, order = list(ops), []
    while pending:
        progress = False
        for op in list(pending):
            if all(v in ready for v in op.inputs):
                order.append(op)
                ready.update(op.outputs)
                pending.remove(op)
                progress = True
                break
        if not progress:  # a cycle or a dangling variable: keep file order for the rest
            order.extend(pending)
            break
    return order


def _image_inputs(net: _Net, net_inputs: list[str], consumers) -> set[str]:
    if net.inputs:
        named = {v for v in net.inputs if v in net_inputs}
        if named:
            return named
    return {v for v in net_inputs if any(op.type != "loss" for op in consumers.get(v, []))}


# -- conv layers -------------------------------------------------------------------------------

def _conv_layer(op: _Op, in_shape, index: int):
    """(Layer, output shape), or a string saying why the layer cannot be read."""
    filters = _array(op.params[0]) if op.params else None
    if filters is None or filters.size == 0:
        return "it has no stored weights"
    if filters.ndim > 4:
        return f"its weights have {filters.ndim} dimensions (expected H x W x Cin x Cout)"
    op.params[0] = None  # the graph owns the weights now; keep no second reference
    kh, kw, wcin, cout = filters.shape + (1,) * (4 - filters.ndim)
    weight = _torch_layout(filters, (kh, kw, wcin, cout))
    del filters
    bias = _array(op.params[1]) if len(op.params) > 1 else None
    bias = None if bias is None or bias.size == 0 else _float(bias.reshape(-1, order="F"))
    attrs = op.attrs
    c_in, h, w = in_shape
    transposed = op.type == "convt"
    if transposed:
        groups = _int(_get(attrs, "numGroups"), 1)
        upsample = _pair(_get(attrs, "upsample"), 1)
        crop = _pads(_get(attrs, "crop"))
        out_c = wcin * groups
        if bias is not None and bias.size != out_c:
            return f"its biases have {bias.size} values for {out_c} output channels"
        out = (out_c, _convt_size(h, kh, upsample[0], crop[0]), _convt_size(w, kw, upsample[1], crop[1]))
        layer = Layer(name=op.name, index=index, kind="conv_transpose2d", weight=weight, bias=bias, stride=upsample,
                      padding=crop, dilation=(1, 1), groups=groups, output_padding=(0, 0))
    else:
        if bias is not None and bias.size != cout:
            return f"its biases have {bias.size} values for {cout} filters"
        stride = _pair(_get(attrs, "stride"), 1)
        dilation = _pair(_get(attrs, "dilate"), 1)
        pads = _pads(_get(attrs, "pad"))
        groups = _groups(c_in, wcin, cout)
        out = (cout, _out_size(h, kh, stride[0], pads[0], dilation[0]),
               _out_size(w, kw, stride[1], pads[1], dilation[1]))
        layer = Layer(name=op.name, index=index, kind="conv2d", weight=weight, bias=bias, stride=stride,
                      padding=pads, dilation=dilation, groups=groups)
    layer.input_shape = _known(in_shape)
    layer.output_shape = _known(out)
    return layer, out


def _conv_in_channels(op: _Op) -> int | None:
    filters = _array(op.params[0]) if op.params else None
    if filters is None or filters.ndim < 2:
        return None
    shape = filters.shape + (1,) * (4 - filters.ndim)
    if op.type == "convt":
        return int(shape[3])
    return int(shape[2])


def _groups(c_in: int | None, wcin: int, cout: int) -> int | None:
    if c_in is None:
        return None
    if c_in % wcin or cout % (c_in // wcin):
        return None  # the file contradicts itself; leave groups unknown rather than guess
    return c_in // wcin


def _torch_layout(filters: np.ndarray, dims: tuple[int, int, int, int]) -> np.ndarray:
    """H x W x Cin x Cout (MATLAB, column-major) -> a (Cout, Cin, H, W) view, without copying.

    The view is not C-contiguous, but each filter's weights are one contiguous
    block of the file's memory, which is all the statistics need (the
    projection reads each filter's block in memory order).
    """
    if filters.dtype not in (np.float32, np.float64):
        filters = filters.astype(np.float32, order="F")
    return filters.reshape(dims, order="F").transpose(3, 2, 0, 1)


def _out_size(size, kernel, stride, pads, dilation):
    return None if size is None else conv_output_size(size, kernel, stride, tuple(pads), dilation)


def _convt_size(size, kernel, upsample, crop):
    if size is None:
        return None
    return (size - 1) * upsample + kernel - crop[0] - crop[1]


# -- folding -------------------------------------------------------------------------------------

def _fold(op: _Op, sources: list[_Node], consumers, skipped) -> bool:
    """Fold a bnorm (or dagnn.Scale) that directly follows a conv, feeding nothing else, into it."""
    if len(op.inputs) != 1 or not sources or sources[0].op != "layer" or len(consumers.get(op.inputs[0], [])) != 1:
        return False
    layer = sources[0].layer
    out_axis = 1 if layer.transposed else 0
    if op.type == "bnorm":
        values = _bnorm_values(op, layer.out_channels)
        if values is None:
            return False
        gamma, beta, mean, sigma = values
        # MatConvNet divides by the stored sigma = sqrt(var + eps): fold with var = sigma^2 and eps = 0,
        # which is exact because sqrt(sigma^2) == |sigma| in IEEE arithmetic.
        layer.weight, layer.bias = fold_batchnorm(layer.weight, layer.bias, mean, sigma * sigma, gamma, beta,
                                                  eps=0.0, out_axis=out_axis, groups=layer.groups or 1)
        layer.bn_folded = True
        return True
    scale = _vector(op.params[0] if op.params else None)
    shift = _vector(op.params[1] if len(op.params) > 1 else None)
    channels = layer.out_channels
    if scale is None or scale.size not in (1, channels) or layer.transposed or (shift is not None and shift.size != channels):
        return False
    layer.weight, layer.bias = fold_affine(layer.weight, layer.bias, scale, shift)
    return True


def _bnorm_values(op: _Op, channels: int | None):
    params = list(op.params) + [None] * (3 - len(op.params))
    gamma, beta, moments = (_vector(params[0]), _vector(params[1]), _array(params[2]))
    if moments is None or moments.size == 0 or moments.size % 2:
        return None
    count = moments.size // 2
    if channels is not None and count != channels:
        return None
    m = np.asarray(moments, np.float64)
    if m.ndim == 2 and m.shape == (2, count) and count != 2:
        mean, sigma = m[0], m[1]
    else:
        m = m.reshape(count, 2, order="F")
        mean, sigma = m[:, 0], m[:, 1]
    gamma = np.ones(count) if gamma is None else gamma
    beta = np.zeros(count) if beta is None else beta
    if gamma.size != count or beta.size != count:
        return None
    return gamma, beta, mean, sigma


# -- ops, shapes, activations, predecessors -------------------------------------------------------

def _via_name(op: _Op) -> str:
    if op.type == "pool":
        method = _text(_get(op.attrs, "method"), "max").lower()
        return "avg_pool2d" if method.startswith("avg") else "max_pool2d"
    if op.type == "relu" and _float_value(_get(op.attrs, "leak"), 0.0) != 0:
        return "leaky_relu"
    if op.type in VIA_NAMES:
        return VIA_NAMES[op.type]
    return (op.raw_type.split(".", 1)[-1] if op.raw_type else "unknown").lower()


def _op_shape(op: _Op, in_shapes: list[tuple]):
    if not in_shapes or op.problem is not None:
        return None
    first = in_shapes[0]
    if op.type in _SAME_SHAPE or op.type == "sum":
        return first
    if op.type == "pool":
        size = _pair(_get(op.attrs, "pool", _get(op.attrs, "poolSize")), 1)
        stride = _pair(_get(op.attrs, "stride"), 1)
        pads = _pads(_get(op.attrs, "pad"))
        return (first[0], _out_size(first[1], size[0], stride[0], pads[0], 1),
                _out_size(first[2], size[1], stride[1], pads[1], 1))
    if op.type == "concat":
        axis = {1: 1, 2: 2, 3: 0}.get(_int(_get(op.attrs, "dim"), 3))
        if axis is None:
            return None
        values = [s[axis] for s in in_shapes]
        total = None if any(v is None for v in values) else sum(values)
        return tuple(total if i == axis else first[i] for i in range(3))
    if op.type == "crop" and len(in_shapes) > 1:
        return (first[0], in_shapes[1][1], in_shapes[1][2])
    return None


def _activation_after(var: str, consumers, fold_bn: bool) -> tuple[str, dict[str, float]]:
    """The nonlinearity applied to the layer's output, seen through dropout (and unfolded BN)."""
    passable = _IDENTITIES | (set() if fold_bn else {"bnorm"})
    while True:
        nxt = consumers.get(var, [])
        if len(nxt) != 1:
            return "none", {}
        op = nxt[0]
        if op.type == "relu":
            leak = _float_value(_get(op.attrs, "leak"), 0.0)
            return ("leaky_relu", {"negative_slope": leak}) if leak != 0 else ("relu", {})
        if VIA_NAMES.get(op.type) in ACTIVATIONS:
            return VIA_NAMES[op.type], {}
        if op.type not in passable or not op.outputs:
            return "none", {}
        var = op.outputs[0]


def _predecessors(node: _Node) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    def endpoint(current: _Node) -> str | None:
        if current.layer is not None:
            return current.layer.name
        return INPUT if current.op in ("input", "missing") else None

    def op(current: _Node) -> str | None:
        return None if current.op in INFERENCE_IDENTITIES else current.op  # an identity at inference

    return predecessors(node.inputs, endpoint, lambda n: n.inputs, op)


# -- reading MATLAB values (scipy loadmat with struct_as_record=False, robust to True) ------------

_MISSING = object()


def _struct(value: Any) -> Any:
    """A MATLAB struct (or 1x1 struct array, or 1x1 cell holding one) as one struct object, else None."""
    while isinstance(value, np.ndarray) and value.dtype == object:
        if value.size != 1:
            return None if value.size == 0 else value
        value = value.reshape(-1)[0]
    if isinstance(value, np.ndarray) and value.dtype.names:
        return value.reshape(-1)[0] if value.size else None
    return value


def _get(struct: Any, name: str, default: Any = None) -> Any:
    struct = _struct(struct)
    if struct is None:
        return default
    if isinstance(struct, dict):
        value = struct.get(name, _MISSING)
    elif isinstance(struct, np.void):
        value = struct[name] if struct.dtype.names and name in struct.dtype.names else _MISSING
    elif isinstance(struct, np.ndarray):
        value = _MISSING
    else:
        value = getattr(struct, name, _MISSING) if name in getattr(struct, "_fieldnames", ()) else _MISSING
    return default if value is _MISSING else value


def _has(struct: Any, name: str) -> bool:
    return _get(struct, name, _MISSING) is not _MISSING


def _take(struct: Any, name: str) -> Any:
    """Read a field and drop the struct's reference to it, so big arrays can be freed once converted."""
    value = _get(struct, name)
    struct = _struct(struct)
    if value is not None and not isinstance(struct, (np.void, np.ndarray, dict)) and struct is not None:
        setattr(struct, name, None)
    return value


def _take_cells(cell: Any) -> list[Any]:
    if not isinstance(cell, np.ndarray) or cell.dtype != object:
        return [cell]
    values = list(cell.reshape(-1, order="F"))
    cell.fill(None)  # drop the file's references: converted or folded weights then own the memory
    return values


def _items(value: Any) -> list[Any]:
    """Elements of a cell or struct array in MATLAB (column-major) order."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and (value.dtype == object or value.dtype.names):
        return list(value.reshape(-1, order="F"))
    return [value]


def _is_struct(value: Any) -> bool:
    """Whether ``_struct`` gave a struct (a record, a mat_struct, a dict), not a number, string or cell."""
    if isinstance(value, (np.void, dict)):
        return True
    return not isinstance(value, (np.ndarray, str, bytes, int, float)) and value is not None


def _describe(value: Any) -> str:
    """What a MATLAB value is, for a message: 'a 1x1 numeric array', 'an empty cell array', ..."""
    if not isinstance(value, np.ndarray):
        return f"a {type(value).__name__}"
    if value.size == 0:
        return "an empty cell array" if value.dtype == object else "an empty array"
    if value.dtype.kind in "US":
        return f"the text '{_text(value)}'"
    shape = "x".join(str(n) for n in value.shape)
    if value.dtype == object:
        return f"a {shape} cell array"
    kind = {"b": "logical", "f": "numeric", "i": "numeric", "u": "numeric",
            "c": "complex"}.get(value.dtype.kind, str(value.dtype))
    return f"a {shape} {kind} array"


def _is_empty(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.size == 0


def _text(value: Any, default: str = "") -> str:
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return default
        if value.dtype.kind in "US":
            return "".join(str(v) for v in value.reshape(-1))
        if value.dtype == object and value.size == 1:
            return _text(value.reshape(-1)[0], default)
    return default


def _texts(value: Any) -> list[str]:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [t for t in (_text(v) for v in value.reshape(-1, order="F")) if t]
    text = _text(value)
    return [text] if text else []


def _array(value: Any) -> np.ndarray | None:
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.reshape(-1)[0]
    if not isinstance(value, np.ndarray) or value.dtype == object or value.dtype.names:
        return None
    if value.dtype.kind not in "fiub":
        return None
    return value


def _numbers(value: Any) -> np.ndarray | None:
    array = _array(value)
    if array is None or array.size == 0:
        return None
    return np.asarray(array, np.float64).reshape(-1, order="F")


def _vector(value: Any) -> np.ndarray | None:
    return _numbers(value)


def _float(array: np.ndarray) -> np.ndarray:
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def _float_value(value: Any, default: float) -> float:
    numbers = _numbers(value)
    return default if numbers is None else float(numbers[0])


def _int(value: Any, default: int) -> int:
    numbers = _numbers(value)
    return default if numbers is None else int(numbers[0])


def _pair(value: Any, default: int) -> tuple[int, int]:
    numbers = _numbers(value)
    if numbers is None:
        return (default, default)
    if numbers.size == 1:
        return (int(numbers[0]),) * 2
    return (int(numbers[0]), int(numbers[1]))


def _pads(value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """``[top bottom left right]``, ``[y x]`` or a scalar -> ((top, bottom), (left, right))."""
    numbers = _numbers(value)
    if numbers is None:
        return ((0, 0), (0, 0))
    n = [int(v) for v in numbers]
    if len(n) == 1:
        return ((n[0], n[0]), (n[0], n[0]))
    if len(n) < 4:
        return ((n[0], n[0]), (n[1], n[1]))
    return ((n[0], n[1]), (n[2], n[3]))


def _known(shape: Iterable[int | None]) -> tuple[int, ...] | None:
    shape = tuple(shape)
    return None if len(shape) != 3 or any(v is None for v in shape) else tuple(int(v) for v in shape)


def _bytes_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tobytes() if value.dtype.kind in "iu" else value.reshape(-1)[0] if value.size else b""
    if isinstance(value, bytes):
        return value.decode("latin1").rstrip("\x00")
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
