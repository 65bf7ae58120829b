"""Scanning the models of a gallery, one at a time and each in isolation: the job an executor runs.

:func:`scan_chunk` takes plain dicts (picklable, so that a worker process imports torch once for a
whole chunk) and scans each model through :func:`hpa.scan`, the machinery of ``hpa scan``, into
``models/<key>/`` (result.json and model.json, one atomic folder).  Anything a model raises becomes
its record: the category the coverage line counts, and the one-line reason.  A model whose weights
are not cached is not downloaded unless asked (``download``): its record holds the command that
fills the cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from hpa import __version__
from hpa.errors import HpaError, LoadError, OptionError, SpecError, UnsupportedModelError
from hpa.files import atomic_directory
from hpa.gallery.entries import Entry
from hpa.gallery.layout import RECORD, RESULT, model_folder
from hpa.gallery.summary import NO_CONV, layer_counts
from hpa.options import LoadOptions
from hpa.plugins import registries

NOT_CACHED = "not cached"
#: The categories of failure the coverage line counts, by the error raised.
_CATEGORIES = ((UnsupportedModelError, NO_CONV), (SpecError, "unknown model"), (OptionError, "bad option"),
               (LoadError, "load error"), (HpaError, "hpa error"), (MemoryError, "out of memory"))


def scan_chunk(entries: list[Mapping[str, Any]], request: Mapping[str, Any], out: str) -> list[dict[str, Any]]:
    """Scan each entry (an :class:`Entry` as a dict) into ``out``; returns their records, in order."""
    return [scan_entry(Entry(**entry), request, Path(out)) for entry in entries]


def scan_entry(entry: Entry, request: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Scan one model and write its folder; any failure is written as the model's record instead."""
    started = time.monotonic()
    try:
        fill = None if request["download"] else download_command(entry, request)
        if fill is not None:
            record = failure(entry, request, NOT_CACHED, f"no cached weights for {entry.spec}; fill the cache "
                             f"with: {fill} (or pass --download)", fill=fill)
        else:
            result = _scan(entry, request)
            record = success(entry, result.to_dict(), time.monotonic() - started)
            record.update(damaged=result.damaged, run=request["run"])
            write_record(out, entry, record, result.to_json() + "\n")
            return record
    except Exception as exc:  # noqa: BLE001  (each model is isolated: its failure is its row, the gallery goes on)
        record = failure(entry, request, category(exc), one_line(exc))
    record.update(seconds=round(time.monotonic() - started, 3), run=request["run"])
    write_record(out, entry, record, None)
    return record


def _scan(entry: Entry, request: Mapping[str, Any]):
    import hpa  # here, not at the top: hpa.api's loaders import torch when they run

    loader = registries()["loaders"].get(entry.loader)
    declared = {option.name for option in loader.options}
    declared |= {option.name for name in request["statistics"] for option in registries()["statistics"].get(name).options}
    options = {key: value for key, value in request["options"].items() if key in declared}
    weights = "DEFAULT" if entry.is_file else request["weights"]  # a file carries its own weights
    return hpa.scan(entry.spec, statistics=list(request["statistics"]), weights=weights, seed=request["seed"],
                    input_size=request["input_size"], fold_bn=request["fold_bn"],
                    trust_pickle=request["trust_pickle"], skip_1x1=request["skip_1x1"],
                    with_linear=request["with_linear"], **options)


def download_command(entry: Entry, request: Mapping[str, Any]) -> str | None:
    """The loader's command that fills the cache for this model, or None when nothing needs downloading."""
    loader = registries()["loaders"].get(entry.loader)
    if entry.is_file or loader.download_command is None:
        return None
    weights = request["weights"]
    options = LoadOptions(weights=None if weights.upper() == "DEFAULT" else weights, seed=request["seed"])
    return loader.download_command(entry.name, options)


def success(entry: Entry, result: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    source = result["model"]
    weights = source.get("weights")
    if entry.is_file:
        weights = "file"
    elif weights != "none" and source.get("pretrained_tag"):  # timm's tag names its weight set
        weights = source["pretrained_tag"]
    return {**_identity(entry), "status": "ok", "weights": weights, "seed": source.get("seed"),
            "input_size": source.get("input_size"), "layers": layer_counts(result), "seconds": round(seconds, 3),
            "hpa_version": __version__}


def failure(entry: Entry, request: Mapping[str, Any], kind: str, reason: str, fill: str | None = None
            ) -> dict[str, Any]:
    record = {**_identity(entry), "status": "failed", "weights": "file" if entry.is_file else request["weights"],
              "category": kind, "reason": reason, "hpa_version": __version__}
    if fill is not None:
        record["fill_command"] = fill
    return record


def _identity(entry: Entry) -> dict[str, Any]:
    return {"loader": entry.loader, "name": entry.name, "spec": entry.spec, "key": entry.key}


def category(exc: BaseException) -> str:
    for kind, name in _CATEGORIES:
        if isinstance(exc, kind):
            return name
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)):
        return "out of memory"
    return "build error"  # raised by the framework while building or tracing the model


def one_line(exc: BaseException) -> str:
    """An hpa error's message (written for a user), else the exception's type and its first line."""
    text = str(exc).strip()
    if isinstance(exc, HpaError):
        return " ".join(text.split())
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def write_record(out: Path, entry: Entry, record: Mapping[str, Any], result_json: str | None) -> None:
    """The model's folder, whole and atomically: its record, and its result.json when the scan succeeded."""
    with atomic_directory(model_folder(out, entry.key), what="gallery model folder") as staging:
        if result_json is not None:
            (staging / RESULT).write_text(result_json, encoding="utf-8")
        (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record in a model folder, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

