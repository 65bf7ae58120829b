"""Statistics at every snapshot: the architecture is traced once, each snapshot is rebound to it.

``stats/epoch-NNN.json`` is the :class:`hpa.ScanResult` of that snapshot against
epoch 0 (so distances from the initialisation come with it), and ``series.csv``
holds one row per (epoch, layer) with every scalar per-layer value of every
statistic.  Both are rewritten atomically, after the snapshot and before the
metrics line of the epoch.  ``series.csv`` is made of the stats files' values
only, so it can always be made again from them (:func:`series_rows_of`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hpa
from hpa.errors import LoadError
from hpa.experiments.layout import FINISHED, SERIES, series_rows_of, snapshot_name, stats_name
from hpa.experiments.open_run import RunFolder, RunFolderError
from hpa.files import atomic_write_text, csv_text
from hpa.plugins import registries


class EpochStatistics:
    """Runs ``statistics`` on each snapshot of one run folder."""

    def __init__(self, folder: Path, structure, model, statistics: tuple[str, ...]) -> None:
        self.folder, self.structure, self.model, self.statistics = folder, structure, model, statistics
        self.init = None
        self.rows: list[dict[str, Any]] = []

    def resume(self, done: int, rows: list[dict[str, Any]] | None = None) -> None:
        """Reload epoch 0 and the series rows of epochs up to ``done`` (``rows``: series.csv's, checked)."""
        self.init = self._graph(self.folder / snapshot_name(0))
        rows = RunFolder(self.folder).series_file_rows() if rows is None else rows
        self.rows = [row for row in rows if int(row["epoch"]) <= done]

    def record(self, epoch: int, snapshot: Path) -> None:
        if not self.statistics:
            return
        graph = self._graph(snapshot)
        if epoch == 0:
            self.init = graph
        result = hpa.analyse(graph, init=self.init, statistics=list(self.statistics))
        (self.folder / "stats").mkdir(exist_ok=True)
        atomic_write_text(self.folder / stats_name(epoch), result.to_json() + "\n")
        kept = [row for row in self.rows if int(row["epoch"]) != epoch]
        kept += series_rows_of(epoch, result.to_dict())
        self.rows = sorted(kept, key=lambda row: int(row["epoch"]))  # stable: layers stay in order
        atomic_write_text(self.folder / SERIES, csv_text(self.rows))

    def _graph(self, snapshot: Path):
        """The snapshot as a ConvGraph: rebound to the traced structure (numpy only) when possible."""
        from safetensors.numpy import load_file

        from hpa.rebind import rebind  # here, not at the top: rebind imports numpy

        state = load_file(str(snapshot))
        try:
            return rebind(self.structure, state)
        except LoadError:  # a layer computes its weight in the forward pass: trace that state instead
            if self.model is None:
                raise
            return _retrace(self.model, state, self.structure.input_shape)


# -- repairing what statistics left in a run folder ------------------------------------------------

@dataclass
class StatisticsRepair:
    """The statistics files of one run folder that are damaged, and what will make them again.

    Made by :func:`plan_statistics_repair` without writing anything; :meth:`apply` then rewrites,
    with one warning per file: each damaged stats file recomputed from its snapshot with every
    statistic the run holds values of for that epoch, series.csv from stats/, finished.jsonl
    from the stats files and their times.
    """

    reader: Any  # open_run.RunFolder
    epochs: list[int]  # the snapshot epochs whose statistics count
    rows: list[dict[str, Any]]  # series.csv's rows, or those stats/ gives when it is damaged
    stats: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # epoch -> (problem, statistics)
    series: str | None = None  # series.csv's problem
    finished: str | None = None  # finished.jsonl's problem

    def __bool__(self) -> bool:
        return bool(self.stats or self.series or self.finished)

    def apply(self, structure, model, warn: Callable[[str], None]) -> None:
        folder = self.reader.path
        if self.series:
            atomic_write_text(folder / SERIES, csv_text(self.rows))
            warn(f"{folder / SERIES} {self.series}; rewrote it from stats/")
        if self.stats:
            worker = EpochStatistics(folder, structure, model, ())
            worker.resume(max(self.epochs), self.rows)
            for epoch, (problem, names) in sorted(self.stats.items()):
                worker.statistics = names
                worker.record(epoch, folder / snapshot_name(epoch))
                warn(f"{folder / stats_name(epoch)} {problem}; recomputed it from its snapshot ({', '.join(names)})")
        if self.finished or self.stats:
            self._write_finished(warn)

    def _write_finished(self, warn: Callable[[str], None]) -> None:
        """finished.jsonl of the epochs whose statistics are all there, timed by their stats files."""
        reader = RunFolder(self.reader.path)
        path = reader.path / FINISHED
        wanted = set(reader.record()["config"].get("statistics", []))
        in_series = reader._series_epochs()
        lines = []
        for epoch in self.epochs:
            stats = reader.path / stats_name(epoch)
            if epoch in in_series and stats.exists() and wanted <= reader.statistics_of(epoch):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stats.stat().st_mtime))
                lines.append(json.dumps({"epoch": epoch, "finished": stamp}) + "\n")
        atomic_write_text(path, "".join(lines))
        if self.finished:
            warn(f"{path} {self.finished}; rewrote it from stats/ (each time from its stats file)")


def plan_statistics_repair(reader, epochs: list[int], also: tuple[str, ...] = ()) -> StatisticsRepair:
    """What of stats/, series.csv and finished.jsonl needs making again, for ``epochs`` (snapshot epochs).

    ``also``: statistics to compute for a recomputed epoch besides those it held (analyse-run's).
    Raises a RunFolderError when a damaged file needs a statistic that is not installed.
    """
    series = reader.series_problem()
    rows = reader.series_from_stats(skip_damaged=True) if series else reader.series_file_rows()
    plan = StatisticsRepair(reader, list(epochs), rows, series=series, finished=reader.finished_problem())
    installed = {s.name for s in registries()["statistics"].items()}
    for epoch in epochs:
        problem = reader.stats_problem(epoch)
        if problem is None:
            continue
        names = tuple(dict.fromkeys((*also, *sorted(reader.recorded_statistics(epoch, rows)))))
        missing = [name for name in names if name not in installed]
        if missing:
            raise RunFolderError(f"{reader.path / stats_name(epoch)} {problem}; recomputing it needs the statistic "
                                 f"{missing[0]}, which is not installed: install it, then run the command again")
        if names:
            plan.stats[epoch] = (problem, names)
    return plan


# -- hpa analyse-run ----------------------------------------------------------------------------------


def _retrace(model, state, input_size):
    import torch

    probe = copy.deepcopy(model).cpu()
    probe.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return hpa.load(probe, input_size=input_size)
