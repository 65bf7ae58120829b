"""Recognise a model file by its content, for paths with no or an unknown suffix.

Every check reads a few bytes (a zip's central directory, a header, the tags of
a protobuf's top-level fields) and never unpickles or parses the whole file, so
sniffing an untrusted file is safe and fast.  ``detect(path)`` names the format;
each loader's ``sniff`` callback asks for the formats it reads.

Formats: ``torchscript`` (zip with ``code/``), ``torch_zip`` (zip with
``data.pkl``, what ``torch.save`` writes), ``torch_legacy`` (the pickle
``torch.save`` wrote before 1.6), ``safetensors``, ``onnx`` (a ModelProto) and
``matlab`` (a v5 or v7.3 MAT-file).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

from hpa.errors import SpecError

if TYPE_CHECKING:
    from hpa.registry import Loader, Registry

#: What ``torch.save`` wrote before the zip format: pickle protocol 2, then the
#: pickled long 0x1950a86a20f9469cfc6c (torch's serialization magic number).
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MATLAB_MAGIC = b"MATLAB "  # v5 ("MATLAB 5.0 MAT-file") and v7.3's HDF5 user block alike
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header

# ModelProto's top-level fields (onnx.proto3): field number -> protobuf wire type
# (0 varint, 2 length-delimited).  An ONNX file is nothing but these fields.
_MODEL_PROTO_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_IR_VERSION, _ONNX_GRAPH = 1, 7
_MAX_TOP_LEVEL_FIELDS = 100_000


def detect(path: str | Path) -> str | None:
    """The format of the file at ``path`` (see the module docstring), or None when none matches."""
    import zipfile  # here, not at the top: plugins register sniff at startup and `hpa --help` stays fast

    path = Path(path)
    try:
        if not path.is_file():
            return None
        if zipfile.is_zipfile(path):
            return _zip_format(path)
        with open(path, "rb") as handle:
            for name, check in _CHECKS:
                handle.seek(0)
                if check(handle):
                    return name
    except (OSError, zipfile.BadZipFile):
        return None  # unreadable files are reported by the loader that opens them
    return None


def is_torch_file(path: str | Path) -> bool:
    """TorchScript or torch.save zip, legacy torch pickle, or safetensors"""
    return detect(path) in ("torchscript", "torch_zip", "torch_legacy", "safetensors")


def is_onnx(path: str | Path) -> bool:
    """ONNX ModelProto (protobuf with ir_version and a graph)"""
    return detect(path) == "onnx"


def is_matlab(path: str | Path) -> bool:
    """MATLAB v5 or v7.3 MAT-file header"""
    return detect(path) == "matlab"


def _zip_format(path: Path) -> str | None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # torch writes every entry under one top folder ("archive/", or the file's stem).
    parts = [name.split("/") for name in names]
    if any(_is_code_entry(p) or (len(p) <= 2 and p[-1] == "constants.pkl") for p in parts):
        return "torchscript"
    if any(p[-1] == "data.pkl" and len(p) <= 2 for p in parts):
        return "torch_zip"
    return None


def _is_code_entry(parts: list[str]) -> bool:
    """``top/code/...``, or ``code/__torch__/...`` at the root (a torch.save archive of a file
    once named ``code.pt`` also has a root folder ``code/``, but never ``__torch__`` in it)."""
    if len(parts) >= 3 and parts[1] == "code":
        return True
    return len(parts) >= 3 and parts[0] == "code" and parts[1] == "__torch__"


def _is_torch_legacy(handle: BinaryIO) -> bool:
    return handle.read(len(_TORCH_LEGACY_MAGIC)) == _TORCH_LEGACY_MAGIC


def _is_matlab(handle: BinaryIO) -> bool:
    """Text starting "MATLAB ", then v5's endian mark "IM"/"MI" at byte 126, or v7.3's HDF5
    signature after its 512-byte user block."""
    head = handle.read(520)
    if not head.startswith(_MATLAB_MAGIC):
        return False
    return head[126:128] in (b"IM", b"MI") or head[512:520] == _HDF5_SIGNATURE


def _is_safetensors(handle: BinaryIO) -> bool:
    """An 8-byte little-endian header length, then a JSON object of that length."""
    head = handle.read(8)
    if len(head) < 8:
        return False
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= _SAFETENSORS_MAX_HEADER:
        return False
    text = handle.read(length)
    if len(text) < length or text[:1] != b"{":
        return False
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and all(
        isinstance(v, dict) and "dtype" in v for k, v in header.items() if k != "__metadata__")


def _is_onnx(handle: BinaryIO) -> bool:
    """Walk the top-level protobuf fields by their tags alone (skipping each payload).

    Protobuf has no magic number, so the file is ONNX only when every top-level
    field is one of ModelProto's, with its wire type, the fields end exactly at
    the end of the file, and both ``ir_version`` and ``graph`` are present.
    """
    size = handle.seek(0, 2)
    handle.seek(0)
    seen: set[int] = set()
    position = 0
    for _ in range(_MAX_TOP_LEVEL_FIELDS):
        if position == size:
            return _ONNX_IR_VERSION in seen and _ONNX_GRAPH in seen
        tag = _read_varint(handle)
        if tag is None:
            return False
        number, wire = tag >> 3, tag & 7
        if _MODEL_PROTO_FIELDS.get(number) != wire:
            return False
        value = _read_varint(handle)
        if value is None:
            return False
        if wire == 2:
            if handle.tell() + value > size:
                return False
            handle.seek(value, 1)
        seen.add(number)
        position = handle.tell()
    return False


def _read_varint(handle: BinaryIO) -> int | None:
    result = 0
    for shift in range(0, 70, 7):
        byte = handle.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
    return None


_CHECKS: tuple[tuple[str, Callable[[BinaryIO], bool]], ...] = (
    ("torch_legacy", _is_torch_legacy),
    ("matlab", _is_matlab),
    ("safetensors", _is_safetensors),
    ("onnx", _is_onnx),
)


def sniff_loader(path: str, loaders: Registry[Loader]) -> str:
    """The prefix of the first loader whose ``sniff`` recognises the file's content."""
    tried = []
    for loader in loaders.items():
        if loader.sniff is None:
            continue
        try:
            if loader.sniff(Path(path)):
                return loader.prefix
        except Exception:  # a plugin's faulty check must not hide the other loaders
            pass
        what = (loader.sniff.__doc__ or "").strip().splitlines()
        tried.append(f"{loader.prefix} ({what[0].rstrip('.')})" if what else loader.prefix)
    known = ", ".join(sorted({s for l in loaders.items() for s in l.suffixes})) or "none"
    raise SpecError(
        f"{path} is not a model file hpa recognises: its suffix is none of {known}, and its content "
        f"matches no loader (tried: {'; '.join(tried) or 'no loader can sniff'}); "
        f"name its loader with a prefix (torch:PATH, onnx:PATH, ...) if it is in a format hpa reads"
    )
