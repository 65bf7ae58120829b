"""Reading PyTorch files without executing code from them.

``torch.load`` runs with ``weights_only=True`` (and memory-mapped when the file
allows it) unless the user passed ``--trust-pickle``.  ``.safetensors`` files
are memory-mapped by a small reader of that documented format, so no tensor is
copied until a statistic reads it.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hpa.errors import LoadError, UnsafeFileError
from hpa.files import check_model_file

#: Keys under which checkpoints commonly wrap their state_dict, in order of preference.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                   "weights", "params", "state_dict_ema", "model_ema", "ema")


@dataclass
class Checkpoint:
    """What a torch file held: a state_dict, a module, or a TorchScript module."""

    kind: str  # "state_dict" | "module" | "torchscript"
    state_dict: dict[str, Any] | None = None  # name -> torch.Tensor or np.ndarray
    module: torch.nn.Module | None = None
    key: str | None = None  # the checkpoint key the state_dict came from


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    path = check_model_file(path)
    if path.suffix.lower() == ".safetensors":
        return Checkpoint("state_dict", read_safetensors(path))
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            return Checkpoint("torchscript", module=torch.jit.load(str(path), map_location="cpu"))
        except Exception as exc:
            raise LoadError(f"{path} is a TorchScript archive that torch cannot load ({_first_line(exc)})") from exc
    obj = _torch_load(path, trust_pickle)
    return _interpret(obj, path)


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    checkpoint = read_checkpoint(path, trust_pickle)
    if checkpoint.kind == "state_dict":
        return checkpoint.state_dict
    return dict(checkpoint.module.state_dict())


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL " in text:  # the file names a Python callable to import and run
            culprit = _unsafe_global(text)
            raise UnsafeFileError(
                f"{path} holds pickled Python objects{culprit}; loading it would execute code from the file. "
                "If you trust where it came from, pass --trust-pickle (trust_pickle=True)") from exc
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); "
                        "it is corrupt or in another format") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error, OSError,
            AttributeError, ImportError, KeyError, IndexError, TypeError) as exc:
        hint = "it is truncated" if _looks_truncated(exc) else "it is corrupt or not a PyTorch file"
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); {hint}") from exc


def _interpret(obj: Any, path: Path) -> Checkpoint:
    if isinstance(obj, torch.nn.Module):
        return Checkpoint("module", module=obj)
    if isinstance(obj, Mapping):
        if _is_state_dict(obj):
            return Checkpoint("state_dict", _strip_prefix(dict(obj)))
        for key in CHECKPOINT_KEYS:
            value = obj.get(key)
            if isinstance(value, torch.nn.Module):
                return Checkpoint("module", module=value, key=key)
            if isinstance(value, Mapping) and _is_state_dict(value):
                return Checkpoint("state_dict", _strip_prefix(dict(value)), key=key)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise LoadError(f"{path} is a dict without a state_dict (keys: {keys}); expected tensors, or a "
                        f"state_dict under one of {', '.join(CHECKPOINT_KEYS[:5])}, ...")
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a state_dict, checkpoint or nn.Module")


def _is_state_dict(obj: Mapping) -> bool:
    tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and len(tensors) >= 0.9 * len(obj)


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix DataParallel adds, and non-tensor entries."""
    state = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


# -- safetensors, memory-mapped --------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Name -> read-only numpy view into the memory-mapped file (BF16 converted to float32)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LoadError(f"{path} is too short to be a safetensors file; it is truncated")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise LoadError(f"{path} is not a valid safetensors file (header length {length} exceeds the file); "
                            "it is truncated or corrupt")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoadError(f"{path} is not a valid safetensors file (bad header: {exc})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length) if size > 8 + length else None
    out = {}
    # The header is sorted by dtype and name, not by module order; natural name order
    # ("features.2" before "features.10") is the closest stand-in for module order.
    for name in sorted((k for k in header if k != "__metadata__"), key=natural_key):
        info = header[name]
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or data is None or end > data.shape[0]:
            raise LoadError(f"{path}: tensor {name!r} is unreadable (dtype {info['dtype']}, bytes {start}-{end}); "
                            "the file is truncated or uses an unsupported dtype")
        array = data[start:end].view(dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array
    return out


def natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


# -- messages ----------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or any(w in text for w in ("central directory", "truncated", "ran out"))


def _unsafe_global(text: str) -> str:
    for line in text.splitlines():
        if "GLOBAL " in line:
            name = line.split("GLOBAL ", 1)[1].split()[0]
            return f" (it asks to import {name})"
    return ""
