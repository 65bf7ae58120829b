"""Statistics at every snapshot: the architecture is traced once, each snapshot is rebound to it.

``stats/epoch-NNN.json`` is the :class:`hpa.ScanResult` of that snapshot against
epoch 0 (so distances from the initialisation come with it), and ``series.csv``
holds one row per (epoch, layer) with every scalar per-layer value of every
statistic.  Both are rewritten atomically, after the snapshot and before the
metrics line of the epoch.
"""

from __future__ import annotations

import copy
import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

from hpa.errors import LoadError, OptionError
from hpa.files import atomic_write_text

SERIES = "series.csv"
# Layer attributes that are not values over epochs (the structure is in graph.json).
_STRUCTURE = {"index", "kind", "out_channels", "in_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "output_padding", "activation", "bn_folded", "input_shape", "output_shape",
              "predecessors", "channel_bias", "inferred", "params", "branch", "name"}


class EpochStatistics:
    """Runs ``statistics`` on each snapshot of one run folder."""

    def __init__(self, folder: Path, structure, model, statistics: tuple[str, ...]) -> None:
        self.folder, self.structure, self.model, self.statistics = folder, structure, model, statistics
        self.init = None
        self.rows: list[dict[str, Any]] = []

    def resume(self, done: int) -> None:
        """Reload epoch 0 and the series rows of epochs up to ``done``."""
        from hpa.experiments.run import snapshot_name

        self.init = self._graph(self.folder / snapshot_name(0))
        path = self.folder / SERIES
        if path.exists():
            with open(path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) <= done]

    def record(self, epoch: int, snapshot: Path) -> None:
        import hpa

        if not self.statistics:
            return
        graph = self._graph(snapshot)
        if epoch == 0:
            self.init = graph
        result = hpa.analyse(graph, init=self.init, statistics=list(self.statistics))
        (self.folder / "stats").mkdir(exist_ok=True)
        atomic_write_text(self.folder / "stats" / f"epoch-{epoch:03d}.json", result.to_json() + "\n")
        kept = [row for row in self.rows if int(row["epoch"]) != epoch]
        for row in result.layer_rows():
            values = {k: v for k, v in row.items() if k not in _STRUCTURE}
            kept.append({"epoch": epoch, "layer": row["name"], **values})
        self.rows = sorted(kept, key=lambda row: int(row["epoch"]))  # stable: layers stay in order
        atomic_write_text(self.folder / SERIES, _csv(self.rows))

    def _graph(self, snapshot: Path):
        """The snapshot as a ConvGraph: rebound to the traced structure (numpy only) when possible."""
        from safetensors.numpy import load_file

        from hpa.rebind import rebind

        state = load_file(str(snapshot))
        try:
            return rebind(self.structure, state)
        except LoadError:  # a layer computes its weight in the forward pass: trace that state instead
            if self.model is None:
                raise
            return _retrace(self.model, state, self.structure.input_shape)


def analyse_run(folder: str | Path, statistics: list[str] | tuple[str, ...],
                progress: Callable[[str], None] | None = None) -> dict[str, list[int]]:
    """Run ``statistics`` over every saved snapshot of a run (or of each seed), skipping epochs done.

    An epoch is done when its ``stats/epoch-NNN.json`` already holds every one of
    ``statistics``; otherwise it is analysed again with those and the statistics it
    already had, so each stats file stays one coherent result.  ``stats/`` and
    ``series.csv`` are rewritten atomically after each epoch (a kill loses at most
    the epoch in hand), then a ``--seeds`` summary and the figures.  Returns
    ``{"analysed": [...], "already_done": [...]}`` (epochs, over all seeds).
    """
    from hpa.experiments.open_run import open_run
    from hpa.experiments.train import _check_statistics

    statistics = tuple(dict.fromkeys(statistics))
    if not statistics:
        raise OptionError("name a statistic with --stat (hpa plugins lists them)")
    _check_statistics(statistics)
    run = open_run(folder)
    report: dict[str, list[int]] = {"analysed": [], "already_done": []}
    for seed in run.seeds:
        _analyse_seed(run, seed, statistics, report, progress or (lambda line: None))
    if len(run.seeds) > 1:
        from hpa.experiments.seeds import write_summary

        write_summary(run.path, run.seeds)
    run.plot()
    return report


def _analyse_seed(run, seed: int, statistics: tuple[str, ...], report, progress) -> None:
    folder = run.folders[seed]
    snapshots = run.snapshots(seed)
    if 0 not in snapshots:
        raise LoadError(f"{folder} has no snapshot of epoch 0 (the initialisation statistics compare with)")
    done = {epoch: _statistics_in(folder, epoch) for epoch in snapshots}
    todo = [epoch for epoch in snapshots if not set(statistics) <= done[epoch]]
    report["already_done"] += [epoch for epoch in snapshots if epoch not in todo]
    if not todo:
        return
    worker = EpochStatistics(folder, run.structure(seed), None, statistics)
    worker.resume(max(snapshots))  # epoch 0 as the init, and the series rows so far
    for epoch in todo:
        names = tuple(dict.fromkeys(statistics + tuple(sorted(done[epoch]))))
        worker.statistics = names
        worker.record(epoch, snapshots[epoch])
        report["analysed"].append(epoch)
        progress(f"{folder.name if len(run.seeds) > 1 else folder}: epoch {epoch} ({', '.join(names)})")


def _statistics_in(folder: Path, epoch: int) -> set[str]:
    import json

    path = folder / "stats" / f"epoch-{epoch:03d}.json"
    try:
        return set(json.loads(path.read_text()).get("statistics", []))
    except (OSError, ValueError):  # missing or damaged: analyse the epoch again
        return set()


def _retrace(model, state, input_size):
    import torch

    import hpa

    probe = copy.deepcopy(model).cpu()
    probe.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return hpa.load(probe, input_size=input_size)


def finite_number(value: Any) -> float | None:
    """A series.csv (or metrics) cell as a finite float; None for blanks, text, NaN and infinities."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
