"""``hpa gallery`` as a library call: expand the specs, scan what is not scanned yet (here, or through
an executor of hpa.executors, a chunk of models per job), then write the table, the coverage line and
the figures.  See :mod:`hpa.gallery.layout` for the folder and :mod:`hpa.gallery.summary` for the numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from hpa.errors import OptionError, OutputError
from hpa.files import atomic_directory, atomic_write_text, check_output_dir, csv_text, replace_manifest
from hpa.gallery import layout
from hpa.gallery.entries import Entry, expand
from hpa.gallery.scan_models import NOT_CACHED, failure, read_record, scan_chunk, scan_entry, write_record
from hpa.gallery.summary import coverage, family, model_row, relative_depths
from hpa.plugins import registries

#: The settings every model of one gallery folder is scanned with; resuming with others is refused.
SETTINGS = ("weights", "statistics", "seed", "input_size", "fold_bn", "skip_1x1", "with_linear", "options")
MAX_CHUNK = 25  # models per executor job at most: torch is imported once per job, progress comes per job


@dataclass
class GalleryReport:
    out: Path
    coverage: str  # the coverage line
    details: list[str]  # one line per failure reason, with its models
    rows: list[dict[str, Any]]  # gallery.csv's rows
    scanned_now: int  # models this call scanned (or tried)
    kept: int  # models already in the folder, skipped
    ignored: list[str] = field(default_factory=list)  # files in the folders given that hpa does not read
    figures: list[Path] = field(default_factory=list)
    kept_logs: Path | None = None  # the executor's logs, kept because a job failed


def run_gallery(specs: Iterable[str], out: str | os.PathLike, *, statistics: Iterable[str] | None = None,
                weights: str | None = "DEFAULT", seed: int = 0, input_size: Any = None, fold_bn: bool = True,
                trust_pickle: bool = False, skip_1x1: bool = False, with_linear: bool = False,
                download: bool = False, retry_failed: bool = False, executor: Any = None, fig_format: str = "png",
                progress: Callable[[Mapping[str, Any]], None] | None = None,
                on_plan: Callable[[int, int], None] | None = None, **options: Any) -> GalleryReport:
    """Scan every model ``specs`` name into the gallery folder ``out`` and summarise the folder.

    ``weights``: "DEFAULT" (cached pretrained weights; ``download`` fetches missing ones), None or "none"
    (seeded initialisations), as for hpa.scan; model files always carry their own.  ``executor``: an
    hpa.executors executor, or None to scan here, one model after the other.  ``progress(record)`` is
    called as each model finishes, ``on_plan(to_scan, kept)`` once before the first.  Bad input (a spec
    matching nothing, an ``out`` holding foreign files, other settings than the folder's) raises before
    anything is written.
    """
    specs = list(specs)
    if not specs:
        raise OptionError("give at least one model spec, such as 'timm:resnet*', a model file or a folder")
    target = check_output_dir(out, nested=True)
    request = _request(statistics, weights, seed, input_size, fold_bn, trust_pickle, skip_1x1, with_linear,
                       download, options)
    previous = _read_request(target)
    if previous is not None:
        _refuse_other_settings(previous, request, out)
    expansion = expand(specs, pretrained=request["weights"].lower() != "none")
    _check_options(request, expansion.entries)
    todo, kept = _plan(expansion.entries, target, retry_failed)
    if on_plan is not None:
        on_plan(len(todo), kept)
    _start_folder(target, request, specs, previous)
    logs = _scan_all(todo, request, target, executor, progress or (lambda record: None))
    report = write_summary(target, fig_format, ignored=expansion.ignored)
    report.scanned_now, report.kept, report.kept_logs = len(todo), kept, logs
    return report


def gallery_executor(flags: Mapping[str, Any], out: str | os.PathLike):
    """The executor the flags of hpa.executors.executor_options name; ``--jobs 1`` too runs worker
    processes, one after the other, each scanning a chunk of models.  Scanning a thousand models in one
    process does not work: its memory grows with every model (the allocators keep what they took), and
    a crash in native code would end the gallery; a worker's crash ends only its chunk."""
    from hpa.executors import make_executor  # here, not at the top: only a gallery with an executor needs it

    flags = dict(flags)
    if (flags.get("executor") or "local") == "local" and flags.get("jobs") is None:
        flags["jobs"] = 1  # not one per GPU: the projection statistic needs none
    out = Path(out).expanduser().absolute()
    return make_executor(dict(flags), out.parent / f".{out.name}.submitit")  # submitit's pickles and logs


# -- the request ------------------------------------------------------------------------------------

def _request(statistics, weights, seed, input_size, fold_bn, trust_pickle, skip_1x1, with_linear, download,
             options) -> dict[str, Any]:
    from hpa.api import parse_input_size  # here, not at the top: hpa.api is the scan machinery (loaders, results)

    names = ["projection"] if statistics is None else list(dict.fromkeys([statistics] if isinstance(statistics, str)
                                                                         else statistics))
    for name in names:
        registries()["statistics"].get(name)  # an unknown name is refused with a "did you mean"
    if "projection" not in names:
        raise OptionError("the gallery's table is built from the projection statistic; add --stat projection")
    if weights is None:
        weights = "none"
    if not isinstance(weights, str):
        raise OptionError(f"weights must be \"DEFAULT\", None (\"none\"), a weights name or a file, not {weights!r}")
    size = parse_input_size(input_size)
    return {"weights": "DEFAULT" if weights.upper() == "DEFAULT" else weights, "statistics": names, "seed": int(seed),
            "input_size": None if size is None else list(size), "fold_bn": bool(fold_bn),
            "skip_1x1": bool(skip_1x1), "with_linear": bool(with_linear), "options": dict(sorted(options.items())),
            "trust_pickle": bool(trust_pickle), "download": bool(download), "run": secrets.token_hex(8)}


def _read_request(target: Path) -> dict[str, Any] | None:
    path = target / layout.REQUEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OutputError(f"--out {target}: its {layout.REQUEST} cannot be read, so hpa cannot tell how it was "
                          "scanned; nothing was changed; give a new --out folder") from None


def _refuse_other_settings(previous: Mapping[str, Any], request: Mapping[str, Any], out) -> None:
    for key in SETTINGS:
        old, new = previous.get("settings", {}).get(key), request[key]
        if old != new:
            flag = "--stat" if key == "statistics" else "-o" if key == "options" else "--" + key.replace("_", "-")
            raise OptionError(f"--out {out} is a gallery scanned with {flag} {_shown(old)}, not {_shown(new)}; "
                              "resume it with the same settings, or give a new --out folder")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _check_options(request: Mapping[str, Any], entries: list[Entry]) -> None:
    """Each -o option must belong to a chosen statistic or to the loader of at least one model."""
    loaders = registries()["loaders"]
    declared = {option.name for prefix in {e.loader for e in entries} for option in loaders.get(prefix).options}
    declared |= {option.name for name in request["statistics"]
                 for option in registries()["statistics"].get(name).options}
    for key in request["options"]:
        if key not in declared:
            from hpa.errors import suggest  # kept next to its only use

            raise OptionError(f"option -o {key} belongs to no loader of these models and no chosen statistic"
                              f"{suggest(key, declared)}; 'hpa plugins' lists the options")


# -- the plan and the folder --------------------------------------------------------------------------

def _plan(entries: list[Entry], target: Path, retry_failed: bool) -> tuple[list[Entry], int]:
    """The entries to scan, and how many the folder already holds: a scanned model is kept, a failed one
    is kept unless ``retry_failed`` (one without cached weights is always looked at again: cheap)."""
    todo, kept = [], 0
    for entry in entries:
        folder = layout.model_folder(target, entry.key)
        record = read_record(folder)
        done = record is not None and (record["status"] == "ok" and (folder / layout.RESULT).is_file()
                                       or record["status"] != "ok" and not retry_failed
                                       and record.get("category") != NOT_CACHED)
        if done:
            kept += 1
        else:
            todo.append(entry)
    return todo, kept


def _start_folder(target: Path, request: Mapping[str, Any], specs: list[str], previous) -> None:
    """The folder, its models/ (a manifest of its own vouches for it) and gallery.json, listed in the manifest."""
    models = target / layout.MODELS
    models.mkdir(parents=True, exist_ok=True)
    if not (models / ".hpa-manifest.json").exists():
        replace_manifest(models, [])
    given = list(dict.fromkeys([*(previous or {}).get("specs", []), *specs]))
    record = {"settings": {key: request[key] for key in SETTINGS}, "specs": given}
    atomic_write_text(target / layout.REQUEST, json.dumps(record, indent=1) + "\n")
    _list_top_files(target)


def _list_top_files(target: Path) -> None:
    replace_manifest(target, [name for name in layout.TOP_FILES if (target / name).is_file()])


# -- scanning -----------------------------------------------------------------------------------------

def _scan_all(todo: list[Entry], request: Mapping[str, Any], target: Path, executor,
              progress: Callable[[Mapping[str, Any]], None]) -> Path | None:
    """Scan ``todo``; returns the folder of the executor's logs when a job failed (kept for reading)."""
    if executor is None:
        for entry in todo:
            progress(scan_entry(entry, request, target))
        return None
    return _scan_with(executor, todo, request, target, progress)


def _scan_with(executor, todo: list[Entry], request: Mapping[str, Any], target: Path,
               progress: Callable[[Mapping[str, Any]], None]) -> Path | None:
    """A chunk of models per job.  A job whose process dies (killed for memory, a crash in native code)
    leaves the records of the models it finished; the model it was on gets the failure, the rest run again."""
    from hpa.executors import Job  # here, not at the top: only a gallery run through an executor needs it

    logs = Path(tempfile.mkdtemp(prefix="hpa-gallery-logs-"))
    failed_job = False
    pending = list(todo)
    while pending:
        chunks = _chunks(pending, getattr(executor, "jobs", 1) or 1)
        jobs = [Job(f"models-{i}", scan_chunk, ([asdict(e) for e in chunk], dict(request), str(target)),
                    logs / f"models-{i}-{len(pending)}.log") for i, chunk in enumerate(chunks)]
        by_name = {job.name: chunk for job, chunk in zip(jobs, chunks)}
        pending = []
        for outcome in executor.run(jobs):
            chunk = by_name[outcome.name]
            if outcome.ok:
                for record in outcome.value:
                    progress(record)
                continue
            failed_job = True
            pending += _after_dead_job(chunk, outcome.error, request, target, progress)
    if not failed_job:
        shutil.rmtree(logs, ignore_errors=True)
        return None
    return logs


def _after_dead_job(chunk: list[Entry], error: str | None, request: Mapping[str, Any], target: Path,
                    progress: Callable[[Mapping[str, Any]], None]) -> list[Entry]:
    """The chunk's entries still to scan after its job died; the one it died on is recorded as failed."""
    for position, entry in enumerate(chunk):
        record = read_record(layout.model_folder(target, entry.key))
        if record is not None and record.get("run") == request["run"]:
            progress(record)
            continue
        record = failure(entry, request, "process died", f"the process scanning it stopped: {error}")
        record["run"] = request["run"]
        write_record(target, entry, record, None)
        progress(record)
        return chunk[position + 1:]
    return []


def _chunks(entries: list[Entry], workers: int) -> list[list[Entry]]:
    """One chunk per worker, at most MAX_CHUNK models each (a worker imports torch once per chunk)."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(entries) / workers)))
    return [entries[i:i + size] for i in range(0, len(entries), size)]


# -- the summary ----------------------------------------------------------------------------------------

def gallery_records(target: Path) -> list[dict[str, Any]]:
    """Every model record in the folder, sorted by loader and name."""
    models = Path(target) / layout.MODELS
    records = []
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            record = read_record(folder)
            if record is not None:
                records.append(record)
    return sorted(records, key=lambda r: (r["loader"], r["name"]))


def write_summary(target: Path, fig_format: str = "png", ignored: Iterable[str] = ()) -> GalleryReport:
    """gallery.csv, coverage.txt, not_cached.txt and the figures, from the records the folder holds."""
    # here, not at the top: matplotlib is imported only when figures are drawn
    from hpa.render.gallery import gallery_figures

    records = gallery_records(target)
    rows = [model_row(record) for record in records]
    line, details = coverage(records)
    ignored = list(ignored)
    notes = [f"ignored {len(ignored)} files hpa does not read: {', '.join(ignored)}"] if ignored else []
    atomic_write_text(target / layout.TABLE, csv_text(rows))
    atomic_write_text(target / layout.COVERAGE, "\n".join([line, *details, *notes]) + "\n")
    atomic_write_text(target / layout.NOT_CACHED, _not_cached_text(records))
    with atomic_directory(target / layout.FIGURES, what="gallery figures folder") as staging:
        written = gallery_figures(_curves(records), staging, fig_format)
    _list_top_files(target)
    figures = [target / layout.FIGURES / path.relative_to(staging) for path in written]
    return GalleryReport(target, line, details, rows, 0, 0, ignored, figures)


def _curves(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    curves = []
    for record in records:
        layers = record.get("layers") or []
        if record["status"] == "ok" and layers:
            curves.append({"name": f"{record['loader']}:{record['name']}",
                           "family": family(record["loader"], record["name"]),
                           "depth": relative_depths(len(layers)),
                           "n_l": [layer["negative"] / layer["filters"] for layer in layers]})
    return curves


def _not_cached_text(records: list[Mapping[str, Any]]) -> str:
    missing = [r for r in records if r.get("category") == NOT_CACHED]
    lines = [f"# {len(missing)} models without cached weights: run each command on a connected machine "
             "(then copy the cache here), or run hpa gallery with --download"]
    return "\n".join(lines + [f"{r['spec']}\t{r.get('fill_command', '')}" for r in missing]) + "\n"
