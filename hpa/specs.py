"""Model specs: ``prefix:name[.tag]`` split at the loader's prefix, or a plain path
recognised by its suffix, or else by its content (:func:`hpa.sniff.sniff_loader`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpa.errors import SpecError, suggest
from hpa.sniff import sniff_loader

if TYPE_CHECKING:
    from hpa.registry import Loader, Registry


@dataclass(frozen=True)
class ParsedSpec:
    prefix: str
    name: str


def parse_spec(spec: str, loaders: Registry[Loader]) -> ParsedSpec:
    """Split ``prefix:name[.tag]`` or recognise a plain file path by its suffix."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in loaders:
        return ParsedSpec(prefix, rest)
    by_suffix = {s: l.prefix for l in loaders.items() for s in l.suffixes}
    lower = spec.lower()
    for suffix in sorted(by_suffix, key=len, reverse=True):
        if lower.endswith(suffix):
            return ParsedSpec(by_suffix[suffix], spec)
    if os.path.isfile(spec):  # no or an unknown suffix: recognise the file by its content
        return ParsedSpec(sniff_loader(spec, loaders), spec)
    if sep and len(prefix) > 1:  # "x:..." but not a Windows drive letter
        raise SpecError(
            f"unknown loader prefix {prefix!r} in {spec!r}{suggest(prefix, loaders.names())} "
            f"(run 'hpa plugins' to see the installed loaders)"
        )
    if os.path.exists(spec):
        kind = "folder" if os.path.isdir(spec) else "file"
        known = ", ".join(sorted(by_suffix)) or "none"
        raise SpecError(
            f"{spec} is a {kind} hpa does not know how to load; give a model file "
            f"({known}) or a spec such as torchvision:resnet18"
        )
    if _looks_like_path(spec):
        known = ", ".join(sorted(by_suffix)) or "none"
        raise SpecError(f"{spec} does not exist; check the path (hpa reads model files ending in {known}, "
                        "or a spec such as torchvision:resnet18)")
    raise SpecError(
        f"{spec!r} is neither a file nor a 'prefix:name' spec; "
        f"try e.g. 'torchvision:{Path(spec).name}' or 'timm:{Path(spec).name}' "
        f"(loaders: {', '.join(loaders.names())})"
    )


def _looks_like_path(spec: str) -> bool:
    """A folder in it, or a file suffix such as ``.h5`` (a timm tag such as ``.tv_in1k`` has an underscore)."""
    suffix = Path(spec).suffix
    return any(sep in spec for sep in ("/", "\\", os.sep)) or spec.startswith(("~", ".")) or bool(
        suffix and "_" not in suffix and suffix[1:2].isalpha() and suffix[1:].isalnum())
