"""Reading PyTorch files without executing code from them.

``torch.load`` runs with ``weights_only=True`` (and memory-mapped when the file
allows it) unless the user passed ``--trust-pickle``.  ``.safetensors`` files
are memory-mapped by a small reader of that documented format, so no tensor is
copied until a statistic reads it.

A checkpoint whose extra entries pickle objects of other packages (Lightning's
``hyper_parameters`` holding ``omegaconf`` containers or an ``argparse.Namespace``)
is read again by :class:`_InertUnpickler`: tensors are built exactly as
``weights_only`` builds them (torch's own allow-list), and every other global
becomes an inert placeholder class that is never imported and never called.
Objects the pickle makes of such a class (``NEWOBJ`` + ``BUILD``, how
``copyreg`` pickles instances) only hold what the file gives them, so the
weights are reached and those entries are skipped with one warning.  A pickle
that asks to *call* a global (``REDUCE``: what ``os.system`` payloads do) other
than a data constructor such as ``collections.defaultdict`` is refused:
``--trust-pickle`` stays the only way to run code from a file.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hpa.errors import HpaWarning, LoadError, OptionError, UnsafeFileError
from hpa.files import check_model_file
from hpa.sniff import detect

#: Keys under which checkpoints commonly wrap their state_dict, in order of preference:
#: the trained weights before their exponential moving average.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                   "weights", "params", "state_dict_ema", "ema_state_dict", "model_ema", "ema")


@dataclass
class Checkpoint:
    """What a torch file held: a state_dict, a module, or a TorchScript module."""

    kind: str  # "state_dict" | "module" | "torchscript"
    state_dict: dict[str, Any] | None = None  # name -> torch.Tensor or np.ndarray
    module: torch.nn.Module | None = None
    key: str | None = None  # the checkpoint key the state_dict came from
    keys: tuple[str, ...] = ()  # every checkpoint key that holds a weight set (state_dict or module)
    module_classes: dict[str, str] = field(default_factory=dict)  # module name -> class, when stored
    # Checkpoint entries not loaded because they pickle other packages' objects: entry -> their globals.
    skipped_entries: dict[str, list[str]] = field(default_factory=dict)


def read_checkpoint(path: str | Path, trust_pickle: bool = False, checkpoint_key: str | None = None) -> Checkpoint:
    """Read a torch file safely; ``checkpoint_key`` picks one of several weight sets."""
    path = check_model_file(path)
    content = detect(path)
    if path.suffix.lower() == ".safetensors" or content == "safetensors":
        _refuse_key_in_flat_file(path, checkpoint_key, "a safetensors file")
        return Checkpoint("state_dict", read_safetensors(path))
    if content == "torchscript":
        _refuse_key_in_flat_file(path, checkpoint_key, "a TorchScript archive")
        try:
            with warnings.catch_warnings():  # torch's deprecation note is not about the user's file
                warnings.simplefilter("ignore", FutureWarning)
                return Checkpoint("torchscript", module=torch.jit.load(str(path), map_location="cpu"))
        except Exception as exc:
            raise LoadError(f"{path} is a TorchScript archive that torch cannot load ({_first_line(exc)}); it is "
                            "damaged, edited or from another torch version: save the model again with "
                            "torch.jit.save") from exc
    obj, inert = _torch_load(path, trust_pickle)
    if inert is not None:
        _refuse_code(obj, inert, path)
    checkpoint = _interpret(obj, path, checkpoint_key)
    if inert is not None:
        checkpoint.skipped_entries = _skipped_entries(obj, path, checkpoint)
    return checkpoint


def read_state_dict(path: str | Path, trust_pickle: bool = False, checkpoint_key: str | None = None) -> dict[str, Any]:
    checkpoint = read_checkpoint(path, trust_pickle, checkpoint_key)
    if checkpoint.kind == "state_dict":
        return checkpoint.state_dict
    return dict(checkpoint.module.state_dict())


def _refuse_key_in_flat_file(path: Path, checkpoint_key: str | None, what: str) -> None:
    if checkpoint_key is not None:
        raise OptionError(f"-o checkpoint_key={checkpoint_key} does not apply: {path} is {what}, "
                          "which holds one weight set; drop the option")


def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, _InertLog | None]:
    """The unpickled object, and the log of the inert unpickler when ``weights_only`` refused the file."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap), None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL " in text:  # the file names a Python global: reach the tensors without importing it
            return _inert_load(path, mmap, _unsafe_global(text))
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); "
                        "it is corrupt or in another format") from exc
    except (ImportError, AttributeError) as exc:
        if trust_pickle:  # the trusted unpickler imports what the file names, and that failed
            raise LoadError(f"{path} pickles objects whose code cannot be imported here ({_first_line(exc)}); "
                            "install the package that defines them, or drop --trust-pickle to read the weights "
                            "without it") from exc
        raise _unreadable(path, exc) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, struct.error, OSError,
            KeyError, IndexError, TypeError) as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> LoadError:
    hint = "it is truncated" if _looks_truncated(exc) else "it is corrupt or not a PyTorch file"
    return LoadError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}); {hint}")


def _interpret(obj: Any, path: Path, checkpoint_key: str | None = None) -> Checkpoint:
    if isinstance(obj, torch.nn.Module):
        _refuse_key_in_flat_file(path, checkpoint_key, "a pickled nn.Module")
        return Checkpoint("module", module=obj)
    if not isinstance(obj, Mapping):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a state_dict, checkpoint or nn.Module")
    if _is_state_dict(obj):
        _refuse_key_in_flat_file(path, checkpoint_key, "a bare state_dict")
        return Checkpoint("state_dict", _strip_prefix(dict(obj)))
    sets = [k for k, v in obj.items()
            if isinstance(v, torch.nn.Module) or (isinstance(v, Mapping) and _is_state_dict(v))]
    key = _choose_weight_set(path, obj, sets, checkpoint_key)
    value, classes = obj[key], _module_classes(obj)
    if isinstance(value, torch.nn.Module):
        return Checkpoint("module", module=value, key=key, keys=tuple(sets), module_classes=classes)
    return Checkpoint("state_dict", _strip_prefix(dict(value)), key=key, keys=tuple(sets), module_classes=classes)


def _choose_weight_set(path: Path, obj: Mapping, sets: list[str], checkpoint_key: str | None) -> str:
    """The requested key, else the preferred of CHECKPOINT_KEYS, else the only weight set."""
    if checkpoint_key is not None:
        if checkpoint_key in sets:
            return checkpoint_key
        present = ", ".join(map(str, sets)) if sets else "none"
        raise OptionError(f"-o checkpoint_key={checkpoint_key}: {path} has no weight set under that key; "
                          f"the keys holding weights are: {present}")
    preferred = [k for k in CHECKPOINT_KEYS if k in sets]
    if preferred:
        return preferred[0]
    if len(sets) == 1:
        return sets[0]
    if sets:
        raise LoadError(f"{path} holds several weight sets ({', '.join(map(str, sets))}); "
                        "pick one with -o checkpoint_key=KEY")
    keys = ", ".join(repr(k) for k in list(obj)[:12]) + (", ..." if len(obj) > 12 else "")
    raise LoadError(f"{path} is a dict without a state_dict (keys: {keys}); expected tensors, or a "
                    f"state_dict under a key such as {', '.join(CHECKPOINT_KEYS[:5])}")


def _module_classes(obj: Mapping) -> dict[str, str]:
    """Module name -> class name, from a module repr (``str(model)``) or a name -> class dict
    that some training scripts store beside the weights; {} when there is none."""
    classes: dict[str, str] = {}
    for value in obj.values():
        if isinstance(value, str):
            classes.update(parse_module_repr(value))
        elif isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in value.items()):
            classes.update({k: v for k, v in value.items() if re.fullmatch(r"[A-Z]\w*", v)})
    return classes


_REPR_LINE = re.compile(r"^(?P<indent> *)\((?P<name>[^)]+)\): (?:\d+ x )?(?P<cls>[A-Za-z_]\w*)\(")


def parse_module_repr(text: str) -> dict[str, str]:
    """``str(model)`` -> {dotted module name: class name}; ``(0-2): 3 x Block(`` expands to 0, 1, 2."""
    classes: dict[str, str] = {}
    stack: list[list[str]] = []
    for line in text.splitlines():
        found = _REPR_LINE.match(line)
        if not found:
            continue
        depth = len(found["indent"]) // 2
        del stack[max(depth - 1, 0):]
        names = _expand_range(found["name"])
        stack.append(names)
        for path in _paths(stack):
            classes[path] = found["cls"]
    return classes


def _expand_range(name: str) -> list[str]:
    bounds = re.fullmatch(r"(\d+)-(\d+)", name)
    return [str(i) for i in range(int(bounds[1]), int(bounds[2]) + 1)] if bounds else [name]


def _paths(stack: list[list[str]]) -> list[str]:
    paths = [""]
    for names in stack:
        paths = [f"{p}.{n}" if p else n for p in paths for n in names]
    return paths


#: Where torch.ao's quantized Linear keeps its (weight, bias) pair, and its dtype, in a state_dict.
_PACKED = "._packed_params._packed_params"
_PACKED_DTYPE = "._packed_params.dtype"


def _is_state_dict(obj: Mapping) -> bool:
    tensors = [v for k, v in obj.items() if isinstance(v, torch.Tensor) or _is_packed(k, v)
               or (isinstance(k, str) and k.endswith(_PACKED_DTYPE))]
    return bool(tensors) and len(tensors) >= 0.9 * len(obj)


def _is_packed(key: Any, value: Any) -> bool:
    return (isinstance(key, str) and key.endswith(_PACKED) and isinstance(value, tuple) and len(value) == 2
            and isinstance(value[0], torch.Tensor))


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix DataParallel adds, and non-tensor entries; a quantized Linear's packed
    (weight, bias) become its ``.weight`` and ``.bias``."""
    for key, value in list(state.items()):
        if _is_packed(key, value):
            module = key[: -len(_PACKED)]
            state[f"{module}.weight"] = value[0]
            if isinstance(value[1], torch.Tensor):
                state[f"{module}.bias"] = value[1]
    state = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# -- checkpoints whose extra entries pickle other packages' objects ------------------------------------

#: Globals a pickle may call to rebuild plain data (containers, dates, paths, numpy arrays): their
#: placeholders are "called" without that being code the file asks to run.
_DATA_CONSTRUCTORS = frozenset({
    "collections.defaultdict", "collections.deque", "collections.OrderedDict", "collections.Counter",
    "builtins.set", "builtins.frozenset", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.complex",
    "builtins.bytearray", "builtins.bytes", "builtins.slice", "builtins.range", "builtins.object",
    "copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__", "_codecs.encode",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "pathlib.Path", "pathlib.PosixPath",
    "pathlib.WindowsPath", "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
})


@dataclass
class _InertLog:
    """What one inert load met: the placeholder class of each global, and the globals the file called."""

    classes: dict[str, type] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    culprit: str = ""  # " (it asks to import X)": the first global weights_only refused


class _InertType(type):
    def __call__(cls, *args, **kwargs):
        # REDUCE (or INST/OBJ): the file asks to call the global with arguments.  Only recorded: an
        # instance of the placeholder is made without running anything of the file's.
        cls._hpa_log.calls.append(cls._hpa_global)
        return cls.__new__(cls)


class _Inert(metaclass=_InertType):
    """Stands for a global of the file that hpa does not import; holds what the pickle puts in it, does nothing."""

    _hpa_global = ""
    _hpa_log: _InertLog

    def __new__(cls, *args, **kwargs):  # NEWOBJ: cls.__new__(cls, *args), an instance without __init__
        return object.__new__(cls)

    def __setstate__(self, state):  # BUILD
        self.__dict__["_hpa_state"] = state

    def append(self, item):  # APPEND(S) into a list subclass
        self.__dict__.setdefault("_hpa_items", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_hpa_items", []).extend(items)

    def __setitem__(self, key, value):  # SETITEM(S) into a dict subclass
        self.__dict__.setdefault("_hpa_entries", {})[key] = value


class _InertUnpickler(pickle.Unpickler):
    """torch's weights_only allow-list for real globals (tensors, storages, dtypes); placeholders for the rest."""

    log = _InertLog()  # replaced per load: see _inert_pickle_module

    def find_class(self, module: str, name: str):
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 spells builtins "__builtin__"
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        allowed = _weights_only_globals().get(qualified)
        if allowed is not None:
            return allowed
        if qualified not in self.log.classes:
            self.log.classes[qualified] = _InertType(name, (_Inert,), {"_hpa_global": qualified, "_hpa_log": self.log})
        return self.log.classes[qualified]


def _weights_only_globals() -> dict[str, Any]:
    """``module.name`` -> object: what torch's ``weights_only`` loader lets a pickle use."""
    # A private function of torch: the very list weights_only applies, so tensors are built alike.
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


def _inert_pickle_module(log: _InertLog):
    """A stand-in for the ``pickle`` module, for ``torch.load(pickle_module=...)``, with its own log."""
    import types

    unpickler = type("Unpickler", (_InertUnpickler,), {"log": log})
    return types.SimpleNamespace(__name__="hpa_inert_pickle", Unpickler=unpickler,
                                 load=lambda file, **kwargs: unpickler(file, **kwargs).load())


def _inert_load(path: Path, mmap: bool, culprit: str) -> tuple[Any, _InertLog]:
    """The file unpickled with placeholders for every global outside torch's allow-list."""
    log = _InertLog()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                         pickle_module=_inert_pickle_module(log))
    except Exception as exc:  # noqa: BLE001 - whatever stops the inert load, the file needs its own code
        raise _unsafe(path, culprit) from exc
    log.culprit = culprit
    return obj, log


def _unsafe(path: Path, culprit: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path} holds pickled Python objects{culprit}; loading it would execute code from the "
                           "file. If you trust where it came from, pass --trust-pickle (trust_pickle=True)")


def _refuse_code(obj: Any, log: _InertLog, path: Path) -> None:
    """Refuse a file that asks to call code (other than data constructors), or that is a pickled object
    (an ``nn.Module``) rather than a dict of entries."""
    calls = [name for name in dict.fromkeys(log.calls) if name not in _DATA_CONSTRUCTORS]
    if calls:
        where = [f"{k!r} " for k, v in (obj.items() if isinstance(obj, Mapping) else ())
                 if set(calls) & set(_globals_in(v))]
        raise UnsafeFileError(f"{path} holds pickled Python objects whose loading runs code: its "
                              f"{where[0] if where else ''}entry asks to call {', '.join(calls)}; hpa did not run "
                              "it. If you trust where the file came from, pass --trust-pickle (trust_pickle=True)")
    if not isinstance(obj, Mapping):
        raise _unsafe(path, log.culprit)
    modules = [f"{k!r} ({type(v)._hpa_global})" for k, v in obj.items() if _is_pickled_module(v)]
    if modules:  # a whole model beside (or instead of) the weights: only its own code can rebuild it
        raise UnsafeFileError(f"{path} holds a pickled nn.Module in its entry {modules[0]}; loading it would "
                              "execute code from the file. If you trust where it came from, pass --trust-pickle "
                              "(trust_pickle=True)")


def _is_pickled_module(value: Any) -> bool:
    """A placeholder rebuilt with an nn.Module's state (its ``_parameters`` and ``_modules``)."""
    state = value.__dict__.get("_hpa_state") if isinstance(value, _Inert) else None
    return isinstance(state, Mapping) and "_parameters" in state and "_modules" in state


def _skipped_entries(obj: Mapping, path: Path, checkpoint: Checkpoint) -> dict[str, list[str]]:
    """{entry: its globals} of the entries skipped; refuses weights that themselves hold placeholders.
    Warns in one line which entries were skipped and why."""
    weights = obj if checkpoint.key is None else obj[checkpoint.key]
    inside = _globals_in(weights)
    if inside:
        raise UnsafeFileError(f"{path} holds pickled Python objects ({_named(inside)}) among its weights; "
                              "reading them would execute code from the file. If you trust where it came from, "
                              "pass --trust-pickle (trust_pickle=True)")
    skipped = {str(k): found for k, v in obj.items() if (found := _globals_in(v))}
    if skipped:
        entries = ", ".join(f"{k!r} ({_named(v)})" for k, v in skipped.items())
        warnings.warn(f"{path}: read the weights under {checkpoint.key!r} without running pickled code; skipped "
                      f"{entries}: objects of other packages, whose code hpa does not import "
                      "(--trust-pickle loads them)", HpaWarning, stacklevel=4)
    return skipped


def _named(names: list[str]) -> str:
    """The classes worth naming (not builtins, typing or data constructors), at most three."""
    shown = [n for n in names if n not in _DATA_CONSTRUCTORS and n.split(".")[0] not in ("builtins", "typing")]
    shown = shown or names
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def _globals_in(value: Any) -> list[str]:
    """The globals of the placeholders anywhere in ``value`` (containers and placeholder states looked into)."""
    found: dict[str, None] = {}
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _Inert):
            found[type(item)._hpa_global] = None
            stack.extend(item.__dict__.values())
        elif isinstance(item, type) and issubclass(item, _Inert):
            found[item._hpa_global] = None
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return sorted(found)


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
