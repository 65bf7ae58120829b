"""Reading run folders: :class:`RunFolder`, the one reader that checks what it reads, and ``hpa.open_run``.

Every command that reads a run folder (``hpa train --resume``, ``hpa analyse-run``,
``hpa reinit``, the ``run:`` loader, ``hpa.open_run``) reads it through
:class:`RunFolder`, which checks each file as it reads it: present, whole (a
snapshot's size against its header, its sha256 against the one metrics.jsonl
recorded) and of the expected shape.  What it finds damaged it either repairs
where that is exact and cheap (``series.csv`` from ``stats/``, ``seeds.json``
from the ``seed-N`` folders, in memory, with one warning) or reports as a
:class:`RunFolderError`: one line naming the file and the fix, raised before the
command has written anything.  The repairs that need the model (``graph.json``,
the first and last snapshot, a statistics file) are ``hpa train --resume``'s.

``hpa.open_run(DIR)`` gives a run's metrics and series as pandas frames, the
graph of any saved epoch rebound from ``graph.json`` and the snapshot (numpy
only: no model, no forward pass), and its figures over epochs.  Torch is never
imported here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from hpa.errors import HpaError, HpaWarning, LoadError, OptionError
from hpa.experiments.layout import (FINISHED, GRAPH_JSON, METRICS, RUN_JSON, SEEDS_JSON, SERIES, SNAPSHOTS, STATE,
                                    finite_number, is_seed_folder, seed_folder, seed_folders, series_rows_of,
                                    snapshot_name, stats_name)
from hpa.files import atomic_write_text
from hpa.graph import ConvGraph, Layer, Skipped
from hpa.plugins import registries
from hpa.render import series, style
from hpa.render.series import RunSeries, decay_epochs, pixels_text, schedule_text

# Keys of run.json that every reader relies on.
_CONFIG_KEYS = ("task", "arch", "seed", "recipe", "snapshot_every", "device")


class RunFolderError(LoadError):
    """A file of a run folder is missing or damaged, and this command cannot repair it."""


def warn(message: str) -> None:
    """One ``Warning:`` line on stderr from the CLI (a repair, or a fallback), shown even with --quiet."""
    warnings.warn(message, HpaWarning, stacklevel=3)


# -- one run folder ---------------------------------------------------------------------------

class RunFolder:
    """One ``hpa train`` run folder, read with checks; see the module docstring.

    ``resume_target`` is the folder ``hpa train --resume`` takes to repair it: the
    run itself, or the ``--seeds`` folder it belongs to.
    """

    def __init__(self, path: str | os.PathLike, resume_target: Path | None = None) -> None:
        self.path = Path(path).expanduser()
        in_seeds = is_seed_folder(self.path) and (self.path.parent / SEEDS_JSON).exists()
        self.resume_target = resume_target or (self.path.parent if in_seeds else self.path)
        self._record: dict[str, Any] | None = None
        self._metrics: list[dict[str, Any]] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, resume_target: Path | None = None) -> RunFolder:
        """The run in ``path``; an HpaError naming the folder when it is no run, or a damaged one."""
        folder = cls(path, resume_target)
        if not (folder.path / RUN_JSON).exists():
            if folder.path.is_dir() and folder.holds_run_files():
                raise folder.damaged(RUN_JSON, "is missing", _FIX_RECORD)
            if (folder.path / SEEDS_JSON).exists() or seed_folders(folder.path):
                raise HpaError(f"{folder.path} holds several seeds ({SEEDS_JSON}, seed-N/); give the folder "
                               "itself to 'hpa train --resume' or 'hpa.open_run', or one of its seed-N folders")
            raise HpaError(f"{folder.path} is not an hpa run folder (no {RUN_JSON}); give the --out folder of "
                           "an earlier 'hpa train'")
        folder.record()
        return folder

    def holds_run_files(self) -> bool:
        """True when any file or folder of a run is here (so a missing run.json is damage, not a wrong path)."""
        return any((self.path / name).exists() for name in (GRAPH_JSON, METRICS, SNAPSHOTS, "state", "stats"))

    def damaged(self, name: str, problem: str, fix: str) -> RunFolderError:
        where = self.path / name
        return RunFolderError(f"{where} {problem}; {fix.format(resume=self.resume_target)}")

    # -- run.json and metrics.jsonl: nothing else holds what they hold ------------------------

    def record(self) -> dict[str, Any]:
        """run.json, checked for the keys every reader uses."""
        if self._record is None:
            data = self._json(RUN_JSON, _FIX_RECORD)
            config = data.get("config") if isinstance(data, dict) else None
            missing = [key for key in _CONFIG_KEYS if not isinstance(config, dict) or key not in config]
            if missing or not isinstance(config["recipe"], dict):
                raise self.damaged(RUN_JSON, f"is damaged (it has no config.{(missing or ['recipe'])[0]})",
                                   _FIX_RECORD)
            self._record = data
        return self._record

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's lines, epochs 0, 1, 2, ... without a gap; [] before the first is written."""
        if self._metrics is None:
            self._metrics = self._read_metrics()
        return self._metrics

    def _read_metrics(self) -> list[dict[str, Any]]:
        if not (self.path / METRICS).exists() and not self._trained_past_start():
            return []  # stopped before epoch 0's line: nothing was lost
        lines = []
        for number, line in enumerate(self._text(METRICS, _FIX_METRICS).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise self.damaged(METRICS, f"is damaged or cut off at line {number}", _FIX_METRICS) from None
            if not isinstance(entry, dict) or type(entry.get("epoch")) is not int:
                raise self.damaged(METRICS, f"is damaged (line {number} holds no epoch number)", _FIX_METRICS)
            lines.append(entry)
        epochs = [entry["epoch"] for entry in lines]
        if epochs != list(range(len(epochs))):
            shown = ", ".join(map(str, epochs[:8])) or "none"
            raise self.damaged(METRICS, f"is damaged (its epochs are {shown}, not 0, 1, 2, ...)", _FIX_METRICS)
        return lines

    def _trained_past_start(self) -> bool:
        """True once epoch 0's state is saved, which is after its metrics line: the file must exist then."""
        return (self.path / STATE).exists()

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot_epochs(self) -> list[int]:
        """The epochs whose snapshot the run recorded (metrics.jsonl), whether or not the file is whole."""
        return [entry["epoch"] for entry in self.metrics() if entry.get("snapshot")]

    def snapshots(self) -> dict[int, Path]:
        return {epoch: self.path / snapshot_name(epoch) for epoch in self.snapshot_epochs()}

    def recorded_sha256(self, epoch: int) -> str | None:
        lines = self.metrics()
        return lines[epoch].get("snapshot_sha256") if epoch < len(lines) else None

    def snapshot_problem(self, epoch: int) -> str | None:
        """What is wrong with the snapshot of ``epoch`` ("is missing", "is damaged (truncated ...)"), or None."""
        path = self.path / snapshot_name(epoch)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "is missing"
        except OSError as exc:
            return f"is unreadable ({exc.strerror or exc})"
        problem = _safetensors_layout(path, size)
        if problem is not None:
            return problem
        recorded = self.recorded_sha256(epoch)
        if recorded is not None:
            return None if sha256_of(path) == recorded else (f"is damaged (its sha256 is not the one {METRICS} "
                                                             "recorded when it was written)")
        try:  # a run written before snapshots had a recorded sha256: what safetensors itself checks
            from safetensors.numpy import load_file

            load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            return f"is damaged ({type(exc).__name__})"
        return None

    def snapshot_state(self, epoch: int) -> dict:
        """The weights of ``epoch``'s snapshot as torch tensors, checked first (a RunFolderError names the fix)."""
        from safetensors.torch import load_file  # here, not at the top: this floor imports no torch

        path = self.check_snapshot(epoch)
        try:
            return load_file(str(path))
        except Exception as exc:  # changed since it was checked; safetensors raises its own error types
            raise self.damaged(snapshot_name(epoch), f"is unreadable ({type(exc).__name__})",
                               self.snapshot_fix(epoch)) from None

    def snapshot_fix(self, epoch: int) -> str:
        """How the snapshot of ``epoch`` can be had again."""
        if epoch == 0:
            return "'hpa train --resume {resume}' rebuilds it (epoch 0 is the seeded initialisation)"
        if epoch == max(self.snapshot_epochs(), default=None):
            return f"'hpa train --resume {{resume}}' rewrites it from {STATE}"
        return ("restore it from a backup: hpa cannot rebuild the weights of an intermediate epoch (its statistics "
                "are kept in stats/ and series.csv)")

    def check_snapshot(self, epoch: int) -> Path:
        """The snapshot file of ``epoch``, whole; a RunFolderError naming it and the fix otherwise."""
        saved = self.snapshot_epochs()
        if epoch not in saved:
            shown = ", ".join(map(str, saved)) or "none"
            raise OptionError(f"{self.path} has no snapshot of epoch {epoch}; the saved epochs are {shown}")
        problem = self.snapshot_problem(epoch)
        if problem is not None:
            raise self.damaged(snapshot_name(epoch), problem, self.snapshot_fix(epoch))
        return self.path / snapshot_name(epoch)

    # -- graph.json -----------------------------------------------------------------------------

    def graph_record(self) -> dict[str, Any]:
        """graph.json, checked to hold layers a structure can be made of."""
        data = self._json(GRAPH_JSON, _FIX_GRAPH)
        layers = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(layers, list) or not all(isinstance(entry, dict) and "name" in entry for entry in layers):
            raise self.damaged(GRAPH_JSON, "is damaged (it lists no layers)", _FIX_GRAPH)
        return data

    def graph_problem(self) -> str | None:
        try:
            self.structure()
        except RunFolderError as exc:
            return _problem_of(exc, self.path / GRAPH_JSON)
        return None

    def structure(self):
        """graph.json as a ConvGraph with placeholder weights (see :func:`structure_from_record`)."""
        record = self.graph_record()
        try:
            return structure_from_record(record)
        except Exception as exc:  # a layer entry without the fields Layer.from_attributes needs
            raise self.damaged(GRAPH_JSON, f"is damaged ({type(exc).__name__}: {exc})", _FIX_GRAPH) from None

    # -- statistics: stats/epoch-NNN.json, series.csv, stats/finished.jsonl ----------------------

    def stats(self, epoch: int) -> dict[str, Any] | None:
        """stats/epoch-NNN.json, None when the epoch was never analysed; damaged: a RunFolderError."""
        problem = self.stats_problem(epoch)
        if problem is not None:
            raise self.damaged(stats_name(epoch), problem, _FIX_STATS)
        path = self.path / stats_name(epoch)
        return json.loads(path.read_text()) if path.exists() else None

    def stats_problem(self, epoch: int) -> str | None:
        """What is wrong with the statistics file of ``epoch``, or None (also when it rightly does not exist)."""
        name = stats_name(epoch)
        if not (self.path / name).exists():
            analysed = self.finished_epochs(lenient=True) | self._series_epochs()
            return "is missing" if epoch in analysed else None
        try:
            data = self._json(name, _FIX_STATS)
        except RunFolderError as exc:
            return _problem_of(exc, self.path / name)
        layers = data.get("layers") if isinstance(data, dict) else None
        names = data.get("statistics") if isinstance(data, dict) else None
        if not isinstance(layers, list) or not isinstance(names, list) or not all(
                isinstance(entry, dict) and isinstance(entry.get("statistics"), dict) for entry in layers):
            return "is damaged (it is not a scan result)"
        return None

    def statistics_of(self, epoch: int) -> set[str]:
        """The statistics a good stats file of ``epoch`` holds (empty when missing or damaged)."""
        if self.stats_problem(epoch) is not None:
            return set()
        data = self.stats(epoch)
        return set(data.get("statistics", [])) if data else set()

    def recorded_statistics(self, epoch: int, rows: list[dict[str, Any]] | None = None) -> set[str]:
        """The statistics the run holds values of for ``epoch``: its stats file's, else those series.csv
        and run.json show (what a recomputation must give again, so that nothing recorded is lost)."""
        names = set(self.statistics_of(epoch)) | set(self.record()["config"].get("statistics", []))
        for row in rows if rows is not None else []:
            if str(row.get("epoch")) == str(epoch):
                names |= {key.split(".", 1)[0] for key, value in row.items()
                          if "." in key and value not in ("", None)}
        return names

    def series_problem(self) -> str | None:
        """What is wrong with series.csv, or None (also when no statistic ever ran)."""
        try:
            self.series_file_rows()
        except RunFolderError as exc:
            return _problem_of(exc, self.path / SERIES)
        return None

    def series_rows(self) -> list[dict[str, str]]:
        """series.csv's rows (strings, as written); a damaged file is read from stats/ instead, with a warning."""
        try:
            return self.series_file_rows()
        except RunFolderError as exc:
            rows = self.series_from_stats()  # a RunFolderError of its own when a stats file is damaged too
            warn(f"{_problem_line(exc)}; read its values from stats/ instead ('hpa train --resume "
                 f"{self.resume_target}' rewrites it)")
            return rows

    def series_file_rows(self) -> list[dict[str, str]]:
        path = self.path / SERIES
        if not path.exists():
            if self._analysed_epochs():
                raise self.damaged(SERIES, "is missing", _FIX_SERIES)
            return []
        text = self._text(SERIES, _FIX_SERIES)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if columns[:2] != ["epoch", "layer"]:
            raise self.damaged(SERIES, "is damaged (its header does not start with epoch,layer)", _FIX_SERIES)
        rows = []
        for number, row in enumerate(reader, 2):
            if None in row or None in row.values() or not row["epoch"].isdigit() or not row["layer"]:
                raise self.damaged(SERIES, f"is damaged or cut off at line {number}", _FIX_SERIES)
            rows.append(row)
        per_epoch: dict[int, int] = {}
        for row in rows:
            per_epoch[int(row["epoch"])] = per_epoch.get(int(row["epoch"]), 0) + 1
        lost = [epoch for epoch in self._analysed_epochs() if epoch not in per_epoch]
        if lost or len(set(per_epoch.values())) > 1:  # cut off at a line's end, or lines lost
            what = f"has no rows of epoch {lost[0]}" if lost else "has more layers in some epochs than in others"
            raise self.damaged(SERIES, f"is damaged ({what})", _FIX_SERIES)
        return rows

    def series_from_stats(self, skip_damaged: bool = False) -> list[dict[str, Any]]:
        """series.csv's rows made again from stats/epoch-NNN.json (the very values it was written from).

        A damaged stats file raises, or with ``skip_damaged`` leaves its epoch out (to be recomputed).
        """
        rows: list[dict[str, Any]] = []
        for epoch in self._analysed_epochs():
            if skip_damaged and self.stats_problem(epoch) is not None:
                continue
            rows += series_rows_of(epoch, self.stats(epoch))
        return rows

    def _series_epochs(self) -> set[int]:
        """The epochs series.csv has rows of, as far as it reads (a damaged file is judged on its own)."""
        try:
            return {int(row["epoch"]) for row in self.series_file_rows()}
        except RunFolderError:
            return set()

    def _analysed_epochs(self) -> list[int]:
        return [epoch for epoch in self.snapshot_epochs() if (self.path / stats_name(epoch)).exists()]

    def finished_epochs(self, lenient: bool = False) -> set[int]:
        """Epochs stats/finished.jsonl lists; damaged: a RunFolderError, or with ``lenient`` the lines that read."""
        path = self.path / FINISHED
        if not path.exists():
            return set()
        try:
            text = self._text(FINISHED, _FIX_FINISHED)
        except RunFolderError:
            if lenient:
                return set()
            raise
        epochs = set()
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                epoch = json.loads(line)["epoch"]
            except (ValueError, KeyError, TypeError):
                epoch = None
            if type(epoch) is int:
                epochs.add(epoch)
            elif not lenient:
                raise self.damaged(FINISHED, f"is damaged or cut off at line {number}", _FIX_FINISHED)
        return epochs

    def finished_problem(self) -> str | None:
        """What is wrong with stats/finished.jsonl, or None (also when the run has no statistic of its own)."""
        if not (self.path / FINISHED).exists():
            trained_with = self.record()["config"].get("statistics")
            return "is missing" if trained_with and self._analysed_epochs() else None
        try:
            self.finished_epochs()
        except RunFolderError as exc:
            return _problem_of(exc, self.path / FINISHED)
        return None

    # -- reading text ----------------------------------------------------------------------------

    def _text(self, name: str, fix: str) -> str:
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self.damaged(name, "is missing", fix) from None
        except OSError as exc:
            raise self.damaged(name, f"is unreadable ({exc.strerror or exc})", fix) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged(name, "is damaged (it is not UTF-8 text)", fix) from None
        if "\x00" in text:
            raise self.damaged(name, "is damaged (it holds NUL bytes)", fix)
        return text

    def _json(self, name: str, fix: str) -> Any:
        text = self._text(name, fix)
        try:
            return json.loads(text)
        except ValueError as exc:
            where = f": {exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise self.damaged(name, f"is damaged or cut off (not valid JSON{where})", fix) from None


_FIX_RECORD = "restore it from a backup: nothing else in the run holds its configuration"
_FIX_METRICS = "restore it from a backup: hpa cannot recompute the training losses it holds"
_FIX_GRAPH = "'hpa train --resume {resume}' traces the architecture again and rewrites it"
_FIX_STATS = "'hpa train --resume {resume}' recomputes it from its snapshot"
_FIX_SERIES = "'hpa train --resume {resume}' rewrites it from stats/"
_FIX_FINISHED = "'hpa train --resume {resume}' rewrites it from stats/"


def _problem_of(exc: RunFolderError, path: Path) -> str:
    """The problem words of ``exc`` ("is missing"), without its path and fix."""
    text = str(exc)
    return text[len(str(path)) + 1:].split("; ", 1)[0] if text.startswith(str(path)) else text


def _problem_line(exc: RunFolderError) -> str:
    return str(exc).split("; ", 1)[0]


def _safetensors_layout(path: Path, size: int) -> str | None:
    """Whether ``path`` is whole as its header describes it (cheap: the header only), else the problem."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                return f"is damaged (truncated: {size} bytes, less than its header needs)"
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is damaged (its header is not that of a safetensors file)"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is damaged (truncated: {size} of {expected} bytes)"
    if size > expected:
        return f"is damaged ({size - expected} bytes more than its header describes)"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- several seeds -------------------------------------------------------------------------------

def read_seeds(folder: Path, repair: bool = False) -> list[int] | None:
    """The seeds of a ``--seeds`` folder, None for any other folder.

    A damaged or missing seeds.json is rebuilt from the ``seed-N`` folders (and the ``--seeds``
    of the command they record), with a warning; written back when ``repair``.
    """
    path = folder / SEEDS_JSON
    if not path.exists() and (not seed_folders(folder) or (folder / RUN_JSON).exists()):
        return None
    problem = _seeds_problem(folder)
    if problem is None:
        return json.loads(path.read_text())["seeds"]
    seeds = _seeds_from_folders(folder)
    if not seeds:
        raise RunFolderError(f"{path} {problem}, and no seed-N folder holds a run; restore it from a backup")
    shown = ", ".join(map(str, seeds))
    if repair:
        atomic_write_text(path, json.dumps({"seeds": seeds}) + "\n")
        warn(f"{path} {problem}; rewrote it from the seed-N folders and their command line: seeds {shown}")
    else:
        warn(f"{path} {problem}; read the seeds from the seed-N folders instead: {shown} ('hpa train --resume "
             f"{folder}' rewrites it)")
    return seeds


def _seeds_problem(folder: Path) -> str | None:
    reader = RunFolder(folder)
    try:
        data = reader._json(SEEDS_JSON, "")
    except RunFolderError as exc:
        return _problem_of(exc, folder / SEEDS_JSON)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(
            seeds):
        return "is damaged (it lists no seeds)"
    return None


def _seeds_from_folders(folder: Path) -> list[int]:
    """The seeds the ``seed-N`` folders hold, and those the ``--seeds`` of their recorded command names."""
    import shlex

    found = set(seed_folders(folder))
    for run in seed_folders(folder).values():
        try:
            words = shlex.split(json.loads((run / RUN_JSON).read_text()).get("command") or "")
        except (OSError, ValueError, AttributeError):
            continue
        for flag, value in zip(words, words[1:]):
            if flag == "--seeds":
                found |= {int(part) for part in value.split(",") if part.strip().lstrip("-").isdigit()}
    return sorted(found)


# -- hpa.open_run --------------------------------------------------------------------------------

def open_run(path: str | os.PathLike) -> Run:
    """The run in ``path``: a folder written by ``hpa train --out``, or by ``hpa train --seeds``."""
    folder = Path(path).expanduser()
    seeds = read_seeds(folder)
    if seeds is not None:
        readers = {}
        for seed in seeds:
            run = seed_folder(folder, seed)
            if (run / RUN_JSON).exists() or (run.is_dir() and RunFolder(run).holds_run_files()):
                readers[int(seed)] = RunFolder.open(run, resume_target=folder)
        if not readers:
            raise HpaError(f"no seed of {folder} has started; train it with 'hpa train --resume {folder}'")
        return Run(folder, readers)
    reader = RunFolder.open(folder)  # an HpaError naming the folder when it is not a run
    return Run(folder, {int(reader.record()["config"]["seed"]): reader})


class Run:
    """One training run, or several seeds of one; see :func:`open_run`."""

    def __init__(self, path: Path, readers: dict[int, RunFolder]) -> None:
        self.path = path
        self.readers = dict(sorted(readers.items()))  # seed -> RunFolder
        self.folders = {seed: reader.path for seed, reader in self.readers.items()}  # seed -> run folder

    def __repr__(self) -> str:
        return f"<hpa Run {self.path} seeds={list(self.folders)}>"

    @property
    def seeds(self) -> list[int]:
        return list(self.folders)

    @property
    def record(self) -> dict[str, Any]:
        """run.json of the first seed (every seed shares task, architecture and recipe)."""
        return self._first().record()

    # -- tables -------------------------------------------------------------------------------

    @property
    def metrics(self):
        """metrics.jsonl as a pandas DataFrame, one row per (seed, epoch)."""
        pandas = _pandas()
        return pandas.DataFrame(self._metric_rows()).drop(columns=["snapshot", "snapshot_sha256"], errors="ignore")

    @property
    def series(self):
        """series.csv as a pandas DataFrame, one row per (seed, epoch, layer), numbers as floats."""
        pandas = _pandas()
        frame = pandas.DataFrame(self._series_rows())
        return frame if len(frame) else pandas.DataFrame(columns=["seed", "epoch", "layer"])

    def epochs(self, seed: int | None = None) -> list[int]:
        """The epochs with a saved snapshot."""
        return sorted(self.snapshots(seed))

    def snapshots(self, seed: int | None = None) -> dict[int, Path]:
        """epoch -> snapshot file, as the run recorded them."""
        return self.reader(seed).snapshots()

    def reader(self, seed: int | None = None) -> RunFolder:
        """The :class:`RunFolder` of ``seed`` (None: the only one)."""
        if seed is None:
            if len(self.readers) > 1:
                raise OptionError(f"{self.path} holds seeds {', '.join(map(str, self.readers))}; pass seed=N")
            return self._first()
        if seed not in self.readers:
            raise OptionError(f"{self.path} has no seed {seed}; its seeds are {', '.join(map(str, self.readers))}")
        return self.readers[seed]

    # -- graphs -------------------------------------------------------------------------------

    def structure(self, seed: int | None = None):
        """The traced structure of graph.json as a ConvGraph; its weights are zero-cost placeholders."""
        return self.reader(seed).structure()

    def graph(self, epoch: int, seed: int | None = None):
        """The ConvGraph of the snapshot of ``epoch``, rebound to the run's traced structure."""
        from safetensors import safe_open

        from hpa.rebind import rebind  # here, not at the top: rebind imports numpy

        reader = self.reader(seed)
        structure = reader.structure()
        path = reader.check_snapshot(epoch)
        try:
            with safe_open(str(path), "numpy") as state:
                graph = rebind(structure, state)
        except LoadError:
            raise
        except Exception as exc:  # changed since it was checked
            raise reader.damaged(snapshot_name(epoch), f"is unreadable ({type(exc).__name__}: {exc})",
                                 reader.snapshot_fix(epoch)) from None
        config = reader.record()["config"]
        graph.source.update(model=config["arch"], weights=f"epoch {epoch}", epoch=epoch, seed=config["seed"],
                            run=str(reader.path), input_size=list(graph.input_shape or ()) or None, fold_bn=True)
        return graph

    # -- figures --------------------------------------------------------------------------------

    def run_series(self):
        """The run's values over epochs as :class:`hpa.render.series.RunSeries` (what plot_series gets)."""
        metrics = self._metric_rows()
        config = self.record["config"]
        recipe = config.get("recipe", {})
        # Only step decays are marked (Gamba et al. 2020 A.1): a smooth schedule decays every epoch.
        steps = decay_epochs(m for m in metrics if m["seed"] == self.seeds[0]) if recipe.get("schedule") == "step" \
            else ()
        seeds = self.seeds
        who = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
        layers = tuple(layer["name"] for layer in self._first().graph_record()["layers"])
        results = list(self._results())  # every stats file checked before a figure is drawn
        return RunSeries(rows=self._series_rows(), metrics=metrics, layers=layers,
                         decay_epochs=steps, schedule=schedule_text(recipe) if recipe else "",
                         caption=" · ".join(filter(None, (config["task"], config["arch"], who,
                                                          pixels_text(self.record.get("normalisation", {}))))),
                         statistics=tuple(self._statistics()), results=lambda: iter(results))

    def plot(self, out: str | os.PathLike | None = None, format: str = "png", *, dpi: float | None = None,
             layers: str | None = None) -> list[Path]:
        """Write the figures over epochs into ``out`` (default: the run's ``figures/``); returns the files."""
        folder = Path(out).expanduser() if out is not None else self.path / "figures"
        options = style.FigureOptions(format=format, dpi=dpi, layers=layers)
        statistics = {s.name: s for s in registries()["statistics"].items()}
        run_series = self.run_series()
        with style.drawing(options):
            return series.plot_run(run_series, folder, format, statistics)

    # -- internals ------------------------------------------------------------------------------

    def _first(self) -> RunFolder:
        return next(iter(self.readers.values()))

    def _metric_rows(self) -> list[dict[str, Any]]:
        return [{"seed": seed, **line} for seed, reader in self.readers.items() for line in reader.metrics()]

    def _series_rows(self) -> list[dict[str, Any]]:
        rows = []
        for seed, reader in self.readers.items():
            for row in reader.series_rows():
                values = {k: finite_number(v) for k, v in row.items() if k not in ("epoch", "layer")}
                rows.append({"seed": seed, "epoch": int(row["epoch"]), "layer": row["layer"], **values})
        return rows

    def _statistics(self) -> list[str]:
        names: list[str] = []
        for reader in self.readers.values():
            for name in reader.record()["config"].get("statistics", []):
                names += [] if name in names else [name]
            analysed = reader._analysed_epochs()[-1:]  # analyse-run adds statistics
            for epoch in analysed:
                names += [n for n in (reader.stats(epoch) or {}).get("statistics", []) if n not in names]
        return names

    def _results(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        for seed, reader in self.readers.items():
            for epoch in reader.snapshot_epochs():
                result = reader.stats(epoch)  # missing where the run says it was analysed: refused
                if result is not None:
                    yield seed, epoch, result


def structure_from_record(record: dict[str, Any]):
    """A ConvGraph of graph.json's layers, ready for :func:`hpa.rebind` (placeholder weights, no memory)."""
    layers = [Layer.from_attributes(entry) for entry in record["layers"]]
    skipped = [Skipped(s["name"], s["reason"], s.get("statistic")) for s in record.get("skipped", [])]
    shape = tuple(record.get("input_shape") or ()) or None
    return ConvGraph(layers, source={"spec": record.get("spec")}, skipped=skipped, input_shape=shape)


def _pandas():
    try:
        import pandas
    except ImportError:
        raise HpaError("Run.metrics and Run.series need pandas; pip install pandas") from None
    return pandas
