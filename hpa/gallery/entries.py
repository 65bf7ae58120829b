"""The models a gallery's specs stand for: ``timm:resnet*`` expanded by the timm loader's own list,
``torchvision:resnet18`` as it is, a model file, a folder of model files (walked), a glob of paths.

Listing names belongs to each loader (``Loader.gallery_models``, else ``Loader.list_models``), so a
third-party loader takes part by providing either.  A spec that matches nothing is refused (SpecError).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from hpa.errors import SpecError, suggest
from hpa.plugins import registries
from hpa.registry import match
from hpa.specs import parse_spec

_WILDCARDS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Entry:
    """One model of a gallery."""

    loader: str  # the loader's prefix
    name: str  # the model's name within the loader, or the file's path
    spec: str  # what hpa.scan receives
    key: str  # its folder under models/ (hpa.gallery.layout)
    is_file: bool = False  # a model file: it carries its own weights


@dataclass
class Expansion:
    entries: list[Entry] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files in the folders given that hpa does not read


def expand(specs: Iterable[str], pretrained: bool) -> Expansion:
    """Every model ``specs`` name, each once, in the order given; ``pretrained``: the gallery loads
    pretrained weights (a loader may then list its weight sets rather than its architectures)."""
    found = Expansion()
    keys: dict[str, str] = {}
    for spec in specs:
        for entry in _expand_one(spec, pretrained, found.ignored):
            key = entry.key
            if key in keys and keys[key] != entry.spec:  # two files of one name in different folders
                key = f"{key}-{hashlib.sha256(entry.spec.encode()).hexdigest()[:8]}"
            if key not in keys:
                keys[key] = entry.spec
                found.entries.append(Entry(entry.loader, entry.name, entry.spec, key, entry.is_file))
    return found


def _expand_one(spec: str, pretrained: bool, ignored: list[str]) -> list[Entry]:
    loaders = registries()["loaders"]
    prefix, sep, name = spec.partition(":")
    if sep and prefix in loaders:
        return [Entry(prefix, n, f"{prefix}:{n}", _key(prefix, n)) for n in _loader_names(prefix, name, pretrained)]
    if os.path.isdir(spec):
        return _folder(Path(spec), ignored)
    if os.path.isfile(spec):
        return [_file(Path(spec), Path(spec).name)]
    if _WILDCARDS.search(spec):
        paths = sorted(glob.glob(os.path.expanduser(spec)))
        if not paths:
            raise SpecError(f"no file matches {spec!r}; check the pattern (quote it so the shell leaves it to hpa)")
        return [entry for path in paths for entry in _expand_one(path, pretrained, ignored)]
    parse_spec(spec, loaders)  # raises the spec's own one-line error (a missing file, an unknown prefix)
    raise SpecError(f"{spec} is neither a loader spec, a model file nor a folder")


def _loader_names(prefix: str, pattern: str, pretrained: bool) -> list[str]:
    """The loader's names matching ``pattern`` (a plain name: itself, checked against the loader's list)."""
    loader = registries()["loaders"].get(prefix)
    if loader.gallery_models is None and loader.list_models is None:
        raise SpecError(f"the {prefix} loader has no list of models, so {prefix}:{pattern} cannot be expanded; "
                        "give its model files or a folder of them")
    if not _WILDCARDS.search(pattern):
        known = set(loader.list_models()) if loader.list_models is not None else set(loader.gallery_models(pretrained))
        if pattern not in known and pattern.split(".")[0] not in known:
            raise SpecError(f"no {prefix} model is named {pattern!r}{suggest(pattern, known, prefix + ':')} "
                            f"('hpa list-models {prefix}' lists them)")
        return [pattern]
    names = loader.gallery_models(pretrained) if loader.gallery_models is not None else loader.list_models()
    chosen = match(names, pattern)
    if not chosen:
        literal = max(_WILDCARDS.split(pattern), key=len)
        close = suggest(literal, names, prefix + ":") if len(literal) >= 3 else ""
        weights = " with pretrained weights" if pretrained and loader.gallery_models is not None else ""
        raise SpecError(f"no {prefix} model{weights} matches {pattern!r}{close} "
                        f"('hpa list-models {prefix}' lists them)")
    return chosen


def _folder(root: Path, ignored: list[str]) -> list[Entry]:
    """Every model file below ``root`` (hidden files and folders left out), in sorted order."""
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder, name)
            try:
                entries.append(_file(path, path.relative_to(root).as_posix()))
            except SpecError:
                ignored.append(str(path))
    if not entries:
        raise SpecError(f"the folder {root} holds no model file hpa reads (.pt .pth .bin .safetensors .onnx .mat); "
                        "give a folder of model files or a loader spec such as 'timm:resnet*'")
    return entries


def _file(path: Path, relative: str) -> Entry:
    parsed = parse_spec(str(path), registries()["loaders"])  # a file hpa cannot read raises SpecError
    return Entry(parsed.prefix, str(path), str(path), _key(parsed.prefix, relative), is_file=True)


def _key(prefix: str, name: str) -> str:
    """A folder name for the model: readable, and unique (a hash is added where characters were replaced)."""
    safe = _UNSAFE.sub("_", name.replace("/", "__")).strip("_") or "model"
    key = f"{prefix}-{safe}"
    if safe != name:
        key += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return key
