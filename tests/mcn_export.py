"""Write torch models as MatConvNet model files, in the model zoo's layout, for tests.

``export_simplenn`` writes a sequence of modules as a SimpleNN (``layers`` a cell
array of structs); ``export_dagnn`` writes a DAG of modules as a DagNN (``layers``,
``params`` and ``vars`` struct arrays).  Both write the MATLAB layout honestly:

* weights H x W x Cin x Cout float32, trailing singleton dimensions dropped as
  MATLAB does (a 1x1 conv with one output is stored 1x1xCin, i.e. 3-D or 2-D);
* cell arrays are object arrays, struct arrays are record arrays, numbers are
  double row vectors and strings char arrays, as ``scipy.io.savemat`` maps them;
* ``variant="new"``: ``weights`` cells and ``meta.normalization``;
  ``variant="beta16"``: ``filters``/``biases`` fields and a top-level ``normalization``;
* ``wrap_net=True`` puts everything inside one top-level ``net`` struct.

Supported modules: Conv2d, BatchNorm2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d,
Dropout, ZeroPad2d (merged into the next conv's ``pad``), LocalResponseNorm,
Softmax, and plain dicts, written as raw layer structs (for unknown types).
Each export returns ``{mcn conv name: (pad (l, r, t, b) or None, conv, bn or None)}``
so tests can rebuild what each MatConvNet conv computes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.io
import torch
from torch import nn

Exported = dict[str, tuple[tuple[int, int, int, int] | None, nn.Conv2d, nn.BatchNorm2d | None]]


# -- MATLAB values -----------------------------------------------------------------------------

def matlab_array(array: Any) -> np.ndarray:
    """float32 array with trailing singleton dimensions dropped beyond the second, as MATLAB stores it."""
    a = np.asarray(array, dtype=np.float32)
    shape = list(a.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    while len(shape) < 2:
        shape.append(1)
    return a.reshape(shape)


def row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float64)


def cell(items: Sequence[Any]) -> np.ndarray:
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def struct_array(records: Sequence[dict[str, Any]]) -> np.ndarray:
    names = list(dict.fromkeys(k for r in records for k in r))
    out = np.zeros((1, len(records)), dtype=[(n, object) for n in names])
    for i, record in enumerate(records):
        for name in names:
            out[0, i][name] = record.get(name, np.zeros((0, 0)))
    return out


def filters_of(conv: nn.Conv2d) -> np.ndarray:
    """torch (Cout, Cin/g, H, W) -> MatConvNet H x W x Cin/g x Cout."""
    return matlab_array(conv.weight.detach().cpu().numpy().transpose(2, 3, 1, 0))


def moments_of(bn: nn.BatchNorm2d) -> np.ndarray:
    mean = bn.running_mean.detach().cpu().numpy()
    sigma = np.sqrt(bn.running_var.detach().cpu().numpy().astype(np.float64) + bn.eps)
    return np.stack([mean, sigma], axis=1).astype(np.float32)  # C x 2: [mean, sigma]


def column(tensor: torch.Tensor | None, size: int, fill: float) -> np.ndarray:
    values = np.full(size, fill, np.float32) if tensor is None else tensor.detach().cpu().numpy()
    return np.asarray(values, np.float32).reshape(-1, 1)


def conv_pad(conv: nn.Conv2d, extra: tuple[int, int, int, int] | None) -> list[int]:
    """MatConvNet [top bottom left right] from a conv's padding plus a ZeroPad2d (l, r, t, b) before it."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError("MatConvNet pads with zeros only")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [0, 0, 0, 0]
        else:
            totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
            pads = [totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2]
    else:
        pads = [conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1]]
    if extra is not None:
        left, right, top, bottom = extra
        pads = [pads[0] + top, pads[1] + bottom, pads[2] + left, pads[3] + right]
    return pads


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _pool_fields(module: nn.Module) -> dict[str, Any]:
    if getattr(module, "ceil_mode", False):
        raise NotImplementedError("MatConvNet has no ceil_mode; write the extra padding explicitly")
    if isinstance(module, nn.MaxPool2d) and _pair(module.dilation) != [1, 1]:
        raise NotImplementedError("MatConvNet pooling has no dilation")
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    pad = _pair(module.padding)
    return {"method": "max" if isinstance(module, nn.MaxPool2d) else "avg", "kernel": kernel, "stride": stride,
            "pad": [pad[0], pad[0], pad[1], pad[1]]}


def _zero_pad(module: nn.ZeroPad2d) -> tuple[int, int, int, int]:
    return tuple(int(p) for p in module.padding)  # (left, right, top, bottom)


def _top_level(layers_key: dict[str, Any], input_size: Sequence[int], variant: str, input_name: str,
               wrap_net: bool) -> dict[str, Any]:
    c, h, w = input_size
    normalization = {"imageSize": row(h, w, c), "averageImage": np.zeros((1, 1, 3), np.float32)[..., :c],
                     "keepAspect": True, "border": row(32, 32), "cropSize": row(0.875, 0.875),
                     "interpolation": "bilinear"}
    classes = {"name": cell(["a", "b"]), "description": cell(["class a", "class b"])}
    top = dict(layers_key)
    if variant == "new":
        top["meta"] = {"inputs": {"name": input_name, "size": row(h, w, c, 1)},
                       "normalization": normalization, "classes": classes}
    elif variant == "beta16":
        top["normalization"] = normalization
        top["classes"] = classes
    else:
        raise ValueError(f"variant must be 'new' or 'beta16', not {variant!r}")
    return {"net": top} if wrap_net else top


def _save(path: str | Path, mat: dict[str, Any], compress: bool) -> None:
    scipy.io.savemat(str(path), mat, do_compression=compress, oned_as="column", long_field_names=True)


# -- SimpleNN ------------------------------------------------------------------------------------

def leaf_modules(model: nn.Module | Sequence[Any]) -> list[Any]:
    items = list(model) if isinstance(model, (nn.Sequential, list, tuple)) else [model]
    out: list[Any] = []
    for item in items:
        out.extend(leaf_modules(item) if isinstance(item, nn.Sequential) else [item])
    return out


def export_simplenn(model: nn.Module | Sequence[Any], path: str | Path, *, input_size: Sequence[int],
                    variant: str = "new", wrap_net: bool = False, compress: bool = False,
                    omit_defaults: bool = False) -> Exported:
    """Write ``model`` (a Sequential or a list of modules and raw layer dicts) as a SimpleNN .mat."""
    layers: list[dict[str, Any]] = []
    exported: Exported = {}
    counts: dict[str, int] = {}
    pending_pad = None
    items = leaf_modules(model)
    for i, module in enumerate(items):
        if isinstance(module, nn.ZeroPad2d):
            if not isinstance(items[i + 1] if i + 1 < len(items) else None, nn.Conv2d):
                raise NotImplementedError("a ZeroPad2d must be followed by a Conv2d")
            pending_pad = _zero_pad(module)
            continue
        layer = _simplenn_layer(module, variant, counts, pending_pad, omit_defaults)
        if isinstance(module, nn.Conv2d):
            bn = items[i + 1] if i + 1 < len(items) and isinstance(items[i + 1], nn.BatchNorm2d) else None
            exported[layer["name"]] = (pending_pad, module, bn)
            pending_pad = None
        layers.append(layer)
    mat = _top_level({"layers": cell(layers)}, input_size, variant, "input", wrap_net)
    _save(path, mat, compress)
    return exported


def _name(kind: str, counts: dict[str, int]) -> str:
    counts[kind] = counts.get(kind, 0) + 1
    return f"{kind}{counts[kind]}"


def _simplenn_layer(module: Any, variant: str, counts, pad, omit_defaults: bool) -> dict[str, Any]:
    old = variant == "beta16"
    if isinstance(module, dict):
        return dict(module)
    if isinstance(module, nn.Conv2d):
        name = _name("conv", counts)
        filters = filters_of(module)
        biases = (module.bias.detach().cpu().numpy().reshape(1, -1).astype(np.float32)
                  if module.bias is not None else np.zeros((0, 0), np.float32))
        pads, stride, dilate = conv_pad(module, pad), list(module.stride), list(module.dilation)
        layer: dict[str, Any] = {"name": name, "type": "conv"}
        if old:
            layer.update(filters=filters, biases=biases)
        else:
            layer.update(weights=cell([filters, biases]), size=row(*filters.shape, *(1,) * (4 - filters.ndim)))
        if not (omit_defaults and pads == [0, 0, 0, 0]):
            layer["pad"] = row(pads[0]) if old and len(set(pads)) == 1 else row(*pads)
        if not (omit_defaults and stride == [1, 1]):
            layer["stride"] = row(stride[0]) if old and stride[0] == stride[1] else row(*stride)
        if not (omit_defaults and dilate == [1, 1]) and not (old and dilate == [1, 1]):
            layer["dilate"] = row(*dilate)
        if old:
            layer.update(filtersLearningRate=1.0, biasesLearningRate=2.0, filtersWeightDecay=1.0,
                         biasesWeightDecay=0.0)
        else:
            layer.update(precious=False, opts=cell([]))
        return layer
    if isinstance(module, nn.BatchNorm2d):
        channels = module.num_features
        mult, bias = column(module.weight, channels, 1.0), column(module.bias, channels, 0.0)
        layer = {"name": _name("bn", counts), "type": "bnorm"}
        if old:
            layer.update(filters=mult, biases=bias, moments=moments_of(module))
        else:
            layer.update(weights=cell([mult, bias, moments_of(module)]), precious=False)
        layer["epsilon"] = float(module.eps)
        return layer
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        leak = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
        layer = {"name": _name("relu", counts), "type": "relu"}
        if leak or not omit_defaults:
            layer["leak"] = float(leak)
        return layer
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        f = _pool_fields(module)
        return {"name": _name("pool", counts), "type": "pool", "method": f["method"], "pool": row(*f["kernel"]),
                "stride": row(*f["stride"]), "pad": row(*f["pad"]), "opts": cell([])}
    if isinstance(module, nn.Dropout):
        return {"name": _name("dropout", counts), "type": "dropout", "rate": float(module.p)}
    if isinstance(module, nn.LocalResponseNorm):
        return {"name": _name("norm", counts), "type": "lrn",
                "param": row(module.size, module.k, module.alpha / module.size, module.beta)}
    if isinstance(module, nn.Softmax):
        return {"name": _name("prob", counts), "type": "softmax"}
    raise NotImplementedError(f"no MatConvNet SimpleNN layer for {type(module).__name__}")


# -- DagNN ---------------------------------------------------------------------------------------

@dataclass
class DagNode:
    """One DagNN layer: a module, "sum", "concat", or a raw dict (written as ``{type, block}``)."""

    name: str
    module: Any
    inputs: list[str]
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def chain(model: nn.Module | Sequence[Any], input_name: str = "input") -> list[DagNode]:
    """The DagNN of a sequence of modules: x0 -> layer1 -> x1 -> ..."""
    nodes, var = [], input_name
    for i, module in enumerate(leaf_modules(model)):
        out = f"x{i + 1}"
        nodes.append(DagNode(f"layer{i + 1}", module, [var], [out]))
        var = out
    return nodes


def export_dagnn(nodes: nn.Module | Sequence[Any], path: str | Path, *, input_size: Sequence[int],
                 variant: str = "new", wrap_net: bool = False, compress: bool = False,
                 input_name: str = "input") -> Exported:
    """Write a DAG of modules (``DagNode`` list, or a Sequential) as a DagNN .mat."""
    if not (isinstance(nodes, (list, tuple)) and nodes and isinstance(nodes[0], DagNode)):
        nodes = chain(nodes, input_name)
    nodes = _merge_pads(list(nodes))
    layers, params, exported = [], [], {}
    for node in nodes:
        layer, layer_params = _dagnn_layer(node)
        if isinstance(node.module, nn.Conv2d):
            exported[node.name] = (node.extra.get("pad"), node.module, node.extra.get("bn"))
        layers.append(layer)
        params.extend(layer_params)
    names = list(dict.fromkeys([input_name] + [v for n in nodes for v in n.inputs + n.outputs]))
    variables = [{"name": v, "precious": False} for v in names]
    top = {"layers": struct_array(layers), "vars": struct_array(variables), "params": struct_array(params)}
    _save(path, _top_level(top, input_size, variant, input_name, wrap_net), compress)
    return exported


def _merge_pads(nodes: list[DagNode]) -> list[DagNode]:
    out = []
    for node in nodes:
        if isinstance(node.module, nn.ZeroPad2d):
            users = [n for n in nodes if node.outputs[0] in n.inputs]
            if len(users) != 1 or not isinstance(users[0].module, nn.Conv2d):
                raise NotImplementedError("a ZeroPad2d must feed exactly one Conv2d")
            users[0].inputs = [node.inputs[0] if v == node.outputs[0] else v for v in users[0].inputs]
            users[0].extra["pad"] = _zero_pad(node.module)
            continue
        out.append(node)
    for node in out:  # note which BatchNorm follows each conv, for the tests' numeric checks
        if isinstance(node.module, nn.BatchNorm2d):
            for conv in out:
                if isinstance(conv.module, nn.Conv2d) and conv.outputs[0] in node.inputs:
                    conv.extra["bn"] = node.module
    return out


def _dagnn_layer(node: DagNode) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    module, name = node.module, node.name
    params: list[tuple[str, np.ndarray, float, float]] = []
    if isinstance(module, dict):
        kind, block = module["type"], module.get("block", {})
        params = [(p, v, 1.0, 1.0) for p, v in module.get("params", {}).items()]
    elif isinstance(module, nn.Conv2d):
        kind = "dagnn.Conv"
        filters = filters_of(module)
        has_bias = module.bias is not None
        block = {"size": row(*filters.shape, *(1,) * (4 - filters.ndim)), "hasBias": has_bias, "opts": cell([]),
                 "pad": row(*conv_pad(module, node.extra.get("pad"))), "stride": row(*module.stride),
                 "dilate": row(*module.dilation)}
        params = [(f"{name}_filter", filters, 1.0, 1.0)]
        if has_bias:
            params.append((f"{name}_bias", column(module.bias, 0, 0), 2.0, 0.0))
    elif isinstance(module, nn.BatchNorm2d):
        kind = "dagnn.BatchNorm"
        channels = module.num_features
        block = {"numChannels": float(channels), "epsilon": float(module.eps), "opts": cell([])}
        params = [(f"{name}_mult", column(module.weight, channels, 1.0), 2.0, 0.0),
                  (f"{name}_bias", column(module.bias, channels, 0.0), 1.0, 0.0),
                  (f"{name}_moments", moments_of(module), 0.05, 0.0)]
    elif isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        kind = "dagnn.ReLU"
        leak = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
        block = {"useShortCircuit": True, "leak": float(leak), "opts": cell([])}
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = "dagnn.Pooling"
        f = _pool_fields(module)
        block = {"method": f["method"], "poolSize": row(*f["kernel"]), "opts": cell([]), "pad": row(*f["pad"]),
                 "stride": row(*f["stride"])}
    elif isinstance(module, nn.Dropout):
        kind, block = "dagnn.DropOut", {"rate": float(module.p), "frozen": False}
    elif isinstance(module, nn.LocalResponseNorm):
        kind = "dagnn.LRN"
        block = {"param": row(module.size, module.k, module.alpha / module.size, module.beta)}
    elif isinstance(module, nn.Softmax):
        kind, block = "dagnn.SoftMax", {}
    elif module == "sum":
        kind, block = "dagnn.Sum", {"numInputs": float(len(node.inputs))}
    elif module == "concat":
        kind, block = "dagnn.Concat", {"dim": 3.0, "inputSizes": cell([])}
    else:
        raise NotImplementedError(f"no MatConvNet DagNN layer for {module!r}")
    layer = {"name": name, "type": kind, "inputs": cell(node.inputs), "outputs": cell(node.outputs),
             "params": cell([p[0] for p in params]), "block": block}
    records = [{"name": p, "value": v, "learningRate": lr, "weightDecay": wd} for p, v, lr, wd in params]
    return layer, records


# -- a small residual + concat network, as torch module and as DagNN -----------------------------

class ResidualConcatNet(nn.Module):
    """conv-bn-relu, a residual block (grouped, dilated convs), a concat branch and a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem_bn(self.stem(x))))
        y = torch.relu(self.a_bn(self.a(x)))
        y = torch.relu(self.b(y) + x)
        z = torch.nn.functional.leaky_relu(self.c(y), 0.2)
        return self.head(torch.cat([y, z], 1))

    def dag(self) -> list[DagNode]:
        return [
            DagNode("stem", self.stem, ["input"], ["stem_x"]),
            DagNode("stem_bn", self.stem_bn, ["stem_x"], ["stem_bn_x"]),
            DagNode("stem_relu", nn.ReLU(), ["stem_bn_x"], ["stem_relu_x"]),
            DagNode("pool", self.pool, ["stem_relu_x"], ["pool_x"]),
            DagNode("a", self.a, ["pool_x"], ["a_x"]),
            DagNode("a_bn", self.a_bn, ["a_x"], ["a_bn_x"]),
            DagNode("a_relu", nn.ReLU(), ["a_bn_x"], ["a_relu_x"]),
            DagNode("b", self.b, ["a_relu_x"], ["b_x"]),
            DagNode("sum", "sum", ["b_x", "pool_x"], ["sum_x"]),
            DagNode("sum_relu", nn.ReLU(), ["sum_x"], ["y"]),
            DagNode("c", self.c, ["y"], ["c_x"]),
            DagNode("c_relu", nn.LeakyReLU(0.2), ["c_x"], ["z"]),
            DagNode("concat", "concat", ["y", "z"], ["cat_x"]),
            DagNode("head", self.head, ["cat_x"], ["prediction"]),
        ]


# -- files scipy cannot read -----------------------------------------------------------------------

def _mat_header(text: str, version: int) -> bytes:
    return text.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + struct.pack("<H", version) + b"IM"


def _element(mtype: int, payload: bytes) -> bytes:
    padding = (-len(payload)) % 8
    return struct.pack("<II", mtype, len(payload)) + payload + b"\x00" * padding


def write_mcos_object(path: str | Path, varname: str = "net", classname: str = "dagnn.DagNN") -> None:
    """A MAT v5 file holding one MATLAB object (MCOS), as MATLAB writes a classdef object saved
    without saveobj: an opaque miMATRIX (class 17) with the variable name, the type system
    ``MCOS``, the class name and a uint32 object-id matrix."""
    mi_int8, mi_int32, mi_uint32, mi_matrix = 1, 5, 6, 14
    ids = struct.pack("<6I", 0xDD000000, 2, 1, 1, 1, 1)
    id_matrix = _element(mi_matrix, _element(mi_uint32, struct.pack("<II", 13, 0))
                         + _element(mi_int32, struct.pack("<ii", 6, 1)) + _element(mi_int8, b"")
                         + _element(mi_uint32, ids))
    body = (_element(mi_uint32, struct.pack("<II", 17, 0)) + _element(mi_int8, varname.encode())
            + _element(mi_int8, b"MCOS") + _element(mi_int8, classname.encode()) + id_matrix)
    header = _mat_header("MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018", 0x0100)
    Path(path).write_bytes(header + _element(mi_matrix, body))


def write_v73_header(path: str | Path) -> None:
    """The first bytes of a MATLAB v7.3 file: the 128-byte MAT header, then HDF5 at offset 512.

    (h5py is not a dependency, so this is not a readable HDF5 file; it is what
    MATLAB's header looks like, which is what the loader checks.)"""
    header = _mat_header("MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 "
                         "HDF5 schema 1.00 .", 0x0200)
    superblock = b"\x89HDF\r\n\x1a\n" + b"\x00" * 56
    Path(path).write_bytes(header.ljust(512, b"\x00") + superblock)
