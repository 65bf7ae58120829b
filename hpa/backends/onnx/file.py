"""Read an ONNX model file without copying its weights.

``onnx.load`` reads the whole file into memory and then copies every tensor
into the parsed protobuf, so a 550 MB model briefly costs twice its size.
Here the file is memory-mapped instead, and its protobuf wire format is
scanned just deep enough (ModelProto.graph -> GraphProto.initializer ->
TensorProto.raw_data, and the tensors of Constant nodes, in the main graph and
in every If/Loop/Scan subgraph) to find where each large tensor's bytes lie.
A subgraph's tensor is rewritten as external data that points into the .onnx
file itself, since its name is only unique within its own scope.  Only the
rest (the node list, attributes, small tensors) is parsed by protobuf, and
every large tensor becomes a numpy view of the mapped file.  Tensors stored as
external data beside the model are mapped the same way.

The mapping is copy-on-write (``ACCESS_COPY``), so the arrays are writable
without ever writing to the file, and untouched pages are never read.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpa.errors import LoadError
from hpa.files import check_model_file

# Tensors whose raw bytes are larger than this are mapped, not parsed.  Small
# ones stay in the proto so that shape inference can read shape constants.
INLINE_LIMIT = 4096

# Field numbers: ModelProto.graph, GraphProto.node and .initializer, NodeProto.attribute,
# AttributeProto.t, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER, _NODE_ATTRIBUTE, _ATTRIBUTE_TENSOR, _TENSOR_RAW_DATA = 7, 1, 5, 5, 5, 9
_ATTRIBUTE_GRAPH = 6  # AttributeProto.g: an If branch, a Loop or Scan body

_NUMPY_DTYPES = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
_BFLOAT16 = 16


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


@dataclass(eq=False)
class OnnxFile:
    """A parsed model whose large tensors stay in the mapped file."""

    path: Path
    model: Any  # onnx.ModelProto, large initializers without their raw_data
    size: int  # bytes of the .onnx file itself
    _mapped: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor name -> (offset, length)
    _maps: dict[str, mmap.mmap] = field(default_factory=dict)  # file path -> mapping
    external_files: set[str] = field(default_factory=set)

    def tensor(self, proto: Any, label: str | None = None) -> np.ndarray:
        """The numpy value of a TensorProto of this model (a view of the file where possible).

        ``label`` names the tensor in messages (a branch's tensor by its scoped name).
        """
        name = proto.name
        if name in self._mapped and not _has_inline_data(proto):
            offset, length = self._mapped[name]
            return self._view(str(self.path), proto, offset, length)
        if proto.data_location == 1:  # TensorProto.EXTERNAL
            return self._external(proto, label or proto.name)
        return _small_tensor(proto)

    # -- memory-mapped data ---------------------------------------------------------

    def _map(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size == 0:
                    raise LoadError(f"external data file {path} of {self.path} is empty; "
                                    "copy it again from where the model came from")
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def _view(self, path: str, proto: Any, offset: int, length: int) -> np.ndarray:
        dims = tuple(int(d) for d in proto.dims)
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        dtype = _NUMPY_DTYPES.get(proto.data_type)
        if proto.data_type == _BFLOAT16:
            dtype = np.uint16
        buffer = self._map(path)
        if dtype is None:  # float8, int4, ...: rare; let onnx decode a copy
            return _decoded_copy(proto, bytes(buffer[offset:offset + length]))
        itemsize = np.dtype(dtype).itemsize
        if length != count * itemsize:
            raise LoadError(f"tensor {proto.name!r} in {self.path} holds {length} bytes but its shape "
                            f"{list(dims)} needs {count * itemsize}; the file is damaged or truncated")
        if offset + length > len(buffer):
            raise LoadError(f"tensor {proto.name!r} lies beyond the end of {path}; the file is truncated")
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(dims)
        if proto.data_type == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def _external(self, proto: Any, label: str) -> np.ndarray:
        info = {entry.key: entry.value for entry in proto.external_data}
        location = info.get("location")
        if not location:
            raise LoadError(f"tensor {label!r} in {self.path} is marked as external data "
                            "but names no file")
        target = (self.path.parent / location).resolve()
        if not target.is_file():
            raise LoadError(f"external data file {location!r} for tensor {label!r} is missing "
                            f"(expected at {target}); keep the data files beside {self.path.name}")
        mapped_path = str(target)
        if target == self.path.resolve():  # a subgraph's tensor, pointing into the model file itself
            mapped_path = str(self.path)
        else:
            self.external_files.add(mapped_path)
        buffer = self._map(mapped_path)
        offset = int(info.get("offset", 0) or 0)
        dtype = _NUMPY_DTYPES.get(proto.data_type, np.uint16 if proto.data_type == _BFLOAT16 else None)
        dims = tuple(int(d) for d in proto.dims)
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        default_length = count * np.dtype(dtype).itemsize if dtype is not None else len(buffer) - offset
        length = int(info.get("length", default_length) or default_length)
        if offset + length > len(buffer):
            raise LoadError(f"external data file {target} is too short for tensor {label!r} "
                            f"(needs bytes {offset}..{offset + length}, has {len(buffer)}); it is truncated")
        return self._view(mapped_path, proto, offset, length)


def read_onnx(path: str | os.PathLike) -> OnnxFile:
    """Parse ``path`` (a .onnx file) with its large tensors left in the mapped file."""
    import onnx
    from google.protobuf.message import DecodeError

    path = check_model_file(path, "ONNX model")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    what = f"{path} is not a valid ONNX model"
    try:
        model_bytes, mapped = _strip_large_tensors(buffer, size, path.name)
        model = onnx.ModelProto.FromString(model_bytes)
    except _Malformed as exc:
        raise LoadError(f"{what}: {exc}; the file is damaged, truncated or not ONNX") from None
    except (DecodeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"{what} (protobuf: {first}); the file is damaged, truncated or not ONNX") from None
    _check_model(model, path)
    return OnnxFile(path=path, model=model, size=size, _mapped=mapped, _maps={str(path): buffer})


def _check_model(model: Any, path: Path) -> None:
    graph = model.graph
    if model.ir_version <= 0 or not graph.node:
        raise LoadError(f"{path} is a protobuf file but not an ONNX model (no IR version or no graph nodes); "
                        "export the model with torch.onnx.export or onnx.save")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise LoadError(f"{path} declares no ai.onnx opset; the file is damaged or truncated")


# -- protobuf wire format -------------------------------------------------------------

def _strip_large_tensors(buf: mmap.mmap, size: int, location: str) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Serialized ModelProto without large tensor raw_data, and where that data lies.

    ``location`` is the file's own name, for subgraph tensors (see :func:`_strip_tensor`).
    """
    rest = bytearray()
    graph_range = None
    for number, wire, start, value_start, end in _fields(buf, 0, size):
        if number == _MODEL_GRAPH and wire == 2:
            if graph_range is not None:
                raise _Malformed("two graph fields")
            graph_range = (value_start, end)
        else:
            rest += buf[start:end]
    if graph_range is None:
        return bytes(rest), {}
    graph, mapped = _strip_graph(buf, *graph_range, location=location, nested=False)
    rest += _key(_MODEL_GRAPH) + _varint_bytes(len(graph)) + graph
    return bytes(rest), mapped


def _strip_graph(buf: mmap.mmap, begin: int, stop: int, location: str,
                 nested: bool) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A GraphProto without large tensor data, and where that data lies.

    ``location`` is the model file's name, which the tensors of a subgraph
    (``nested``) point to as external data.
    """
    out = bytearray()
    mapped: dict[str, tuple[int, int]] = {}
    for number, wire, start, value_start, end in _fields(buf, begin, stop):
        if wire != 2 or end - value_start <= INLINE_LIMIT or number not in (_GRAPH_INITIALIZER, _GRAPH_NODE):
            out += buf[start:end]
            continue
        if number == _GRAPH_INITIALIZER:
            stripped = _strip_tensor(buf, value_start, end, mapped, rename=False,
                                     external=location if nested else None)
        else:
            stripped = _strip_node(buf, value_start, end, mapped, location, nested)
        out += buf[start:end] if stripped is None else _key(number) + _varint_bytes(len(stripped)) + stripped
    return bytes(out), mapped


def _strip_node(buf: mmap.mmap, begin: int, stop: int, mapped: dict, location: str, nested: bool) -> bytes | None:
    """A NodeProto whose large attribute tensors (Constant values, subgraph weights) are left in the file."""
    out = bytearray()
    changed = False
    for number, wire, start, value_start, end in _fields(buf, begin, stop):
        stripped = None
        if number == _NODE_ATTRIBUTE and wire == 2 and end - value_start > INLINE_LIMIT:
            attribute = bytearray()
            for n2, w2, s2, v2, e2 in _fields(buf, value_start, end):
                part = None
                if n2 == _ATTRIBUTE_TENSOR and w2 == 2 and e2 - v2 > INLINE_LIMIT:
                    part = _strip_tensor(buf, v2, e2, mapped, rename=True, external=location if nested else None)
                elif n2 == _ATTRIBUTE_GRAPH and w2 == 2 and e2 - v2 > INLINE_LIMIT:
                    part, inner = _strip_graph(buf, v2, e2, location, nested=True)
                    mapped.update(inner)
                attribute += buf[s2:e2] if part is None else _key(n2) + _varint_bytes(len(part)) + part
                changed |= part is not None
            stripped = bytes(attribute)
        out += buf[start:end] if stripped is None else _key(number) + _varint_bytes(len(stripped)) + stripped
    return bytes(out) if changed else None


def _strip_tensor(buf: mmap.mmap, begin: int, stop: int, mapped: dict, rename: bool,
                  external: str | None) -> bytes | None:
    """A TensorProto without its raw_data, recorded in ``mapped``; None if it has no raw_data.

    With ``external`` (a subgraph's tensor) it becomes external data at its own offset in
    that file, the model itself, so nothing needs a name that is unique across scopes.
    """
    from onnx import TensorProto

    tensor = bytearray()
    raw = None
    for number, wire, start, value_start, end in _fields(buf, begin, stop):
        if number == _TENSOR_RAW_DATA and wire == 2:
            raw = (value_start, end - value_start)
        else:
            tensor += buf[start:end]
    if raw is None:  # float_data etc.: protobuf parses it
        return None
    proto = TensorProto.FromString(bytes(tensor))
    if external is not None:
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", str(raw[0])), ("length", str(raw[1]))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto.SerializeToString()
    if rename:  # a Constant's tensor: its name is free, so give it a unique key
        proto.name = f"__hpa_mapped_{raw[0]}"
    mapped[proto.name] = raw
    return proto.SerializeToString()


def _fields(buf, begin: int, stop: int):
    """(field number, wire type, start, value start, end) of each field in buf[begin:stop]."""
    pos = begin
    while pos < stop:
        start = pos
        key, pos = _varint(buf, pos, stop)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {start}")
        value_start = pos
        if wire == 0:
            _, pos = _varint(buf, pos, stop)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, stop)
            value_start = pos
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"unsupported wire type {wire} at byte {start}")
        if pos > stop:
            raise _Malformed(f"a field at byte {start} runs past the end of its message (truncated file?)")
        yield number, wire, start, value_start, pos


def _varint(buf, pos: int, stop: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= stop:
            raise _Malformed(f"the data ends inside a number at byte {pos} (truncated file?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"an over-long number at byte {pos}")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int) -> bytes:
    return _varint_bytes(number << 3 | 2)


# -- small tensors ------------------------------------------------------------------------

def _has_inline_data(proto: Any) -> bool:
    return bool(proto.raw_data or proto.float_data or proto.int32_data or proto.int64_data
                or proto.double_data or proto.uint64_data or proto.string_data or proto.data_location == 1)


def _small_tensor(proto: Any) -> np.ndarray:
    from onnx import numpy_helper

    try:
        array = numpy_helper.to_array(proto)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a damaged tensor
        raise LoadError(f"tensor {proto.name!r} cannot be decoded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _plain(array)


def _decoded_copy(proto: Any, raw: bytes) -> np.ndarray:
    from onnx import TensorProto

    copy = TensorProto()
    copy.CopyFrom(proto)
    copy.ClearField("external_data")
    copy.data_location = TensorProto.DEFAULT
    copy.raw_data = raw
    return _small_tensor(copy)


def _plain(array: np.ndarray) -> np.ndarray:
    """float8/bfloat16/int4 numpy extension types (ml_dtypes) as float32 or int arrays."""
    if array.dtype.kind == "V" or array.dtype.type.__module__.startswith("ml_dtypes"):
        name = str(array.dtype)
        return array.astype(np.int8 if "int" in name else np.float32)
    return array
