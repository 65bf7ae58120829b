"""``hpa.open_run(DIR)``: a finished (or running) training run, read back for analysis.

A run folder of ``hpa train`` (or a ``--seeds`` folder of several) gives its
metrics and series as pandas frames, the graph of any saved epoch rebound from
``graph.json`` and the snapshot (numpy only: no model, no forward pass), and
its figures over epochs.  Torch is never imported here.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

from hpa.errors import HpaError, LoadError, OptionError
from hpa.experiments.run import GRAPH_JSON, METRICS
from hpa.experiments.stats import SERIES, finite_number


def open_run(path: str | os.PathLike) -> Run:
    """The run in ``path``: a folder written by ``hpa train --out``, or by ``hpa train --seeds``."""
    from hpa.experiments.run import RunDir
    from hpa.experiments.seeds import SEEDS_JSON

    folder = Path(path).expanduser()
    if (folder / SEEDS_JSON).is_file():
        seeds = json.loads((folder / SEEDS_JSON).read_text())["seeds"]
        runs = {int(s): folder / f"seed-{s}" for s in seeds if (folder / f"seed-{s}" / "run.json").is_file()}
        if not runs:
            raise HpaError(f"no seed of {folder} has started; train it with 'hpa train --resume {folder}'")
        return Run(folder, runs)
    record = RunDir.open(folder).read_record()  # an HpaError naming the folder when it is not a run
    return Run(folder, {int(record["config"]["seed"]): folder})


class Run:
    """One training run, or several seeds of one; see :func:`open_run`."""

    def __init__(self, path: Path, folders: dict[int, Path]) -> None:
        self.path = path
        self.folders = dict(sorted(folders.items()))  # seed -> run folder

    def __repr__(self) -> str:
        return f"<hpa Run {self.path} seeds={list(self.folders)}>"

    @property
    def seeds(self) -> list[int]:
        return list(self.folders)

    @property
    def record(self) -> dict[str, Any]:
        """run.json of the first seed (every seed shares task, architecture and recipe)."""
        return _read_json(self._first() / "run.json")

    # -- tables -------------------------------------------------------------------------------

    @property
    def metrics(self):
        """metrics.jsonl as a pandas DataFrame, one row per (seed, epoch)."""
        pandas = _pandas()
        return pandas.DataFrame(self._metric_rows()).drop(columns=["snapshot"], errors="ignore")

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
        """epoch -> snapshot file."""
        found = {}
        for path in (self._folder(seed) / "snapshots").glob("epoch-*.safetensors"):
            number = path.name[len("epoch-"):-len(".safetensors")]
            if number.isdigit():
                found[int(number)] = path
        return dict(sorted(found.items()))

    # -- graphs -------------------------------------------------------------------------------

    def structure(self, seed: int | None = None):
        """The traced structure of graph.json as a ConvGraph; its weights are zero-cost placeholders."""
        return structure_from_record(_read_json(self._folder(seed) / GRAPH_JSON))

    def graph(self, epoch: int, seed: int | None = None):
        """The ConvGraph of the snapshot of ``epoch``, rebound to the run's traced structure."""
        from safetensors import safe_open

        from hpa.rebind import rebind

        snapshots = self.snapshots(seed)
        if epoch not in snapshots:
            saved = ", ".join(map(str, snapshots)) or "none"
            raise OptionError(f"{self._folder(seed)} has no snapshot of epoch {epoch}; the saved epochs are {saved}")
        try:
            with safe_open(str(snapshots[epoch]), "numpy") as state:
                graph = rebind(self.structure(seed), state)
        except LoadError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise LoadError(f"{snapshots[epoch]} is unreadable ({type(exc).__name__}: {exc}); it is not a "
                            "complete snapshot of this run") from None
        config = _read_json(self._folder(seed) / "run.json")["config"]
        graph.source.update(model=config["arch"], weights=f"epoch {epoch}", epoch=epoch, seed=config["seed"],
                            run=str(self._folder(seed)), input_size=list(graph.input_shape or ()) or None,
                            fold_bn=True)
        return graph

    # -- figures --------------------------------------------------------------------------------

    def run_series(self):
        """The run's values over epochs as :class:`hpa.render.series.RunSeries` (what plot_series gets)."""
        from hpa.render.series import RunSeries, decay_epochs

        metrics = self._metric_rows()
        record = self.record
        config = record["config"]
        seeds = self.seeds
        who = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
        layers = tuple(layer["name"] for layer in _read_json(self._first() / GRAPH_JSON)["layers"])
        return RunSeries(rows=self._series_rows(), metrics=metrics, layers=layers,
                         decay_epochs=decay_epochs(m for m in metrics if m["seed"] == seeds[0]),
                         caption=f"{config['task']} · {config['arch']} · {who}",
                         statistics=tuple(self._statistics()), results=self._results)

    def plot(self, out: str | os.PathLike | None = None, format: str = "png", *, dpi: float | None = None,
             layers: str | None = None) -> list[Path]:
        """Write the figures over epochs into ``out`` (default: the run's ``figures/``); returns the files."""
        from hpa.plugins import registries
        from hpa.render import series, style

        folder = Path(out).expanduser() if out is not None else self.path / "figures"
        options = style.FigureOptions(format=format, dpi=dpi, layers=layers)
        statistics = {s.name: s for s in registries()["statistics"].items()}
        with style.drawing(options):
            return series.plot_run(self.run_series(), folder, format, statistics)

    # -- internals ------------------------------------------------------------------------------

    def _first(self) -> Path:
        return next(iter(self.folders.values()))

    def _folder(self, seed: int | None) -> Path:
        if seed is None:
            if len(self.folders) > 1:
                raise OptionError(f"{self.path} holds seeds {', '.join(map(str, self.folders))}; pass seed=N")
            return next(iter(self.folders.values()))
        if seed not in self.folders:
            raise OptionError(f"{self.path} has no seed {seed}; its seeds are {', '.join(map(str, self.folders))}")
        return self.folders[seed]

    def _metric_rows(self) -> list[dict[str, Any]]:
        rows = []
        for seed, folder in self.folders.items():
            path = folder / METRICS
            lines = path.read_text().splitlines() if path.exists() else []
            rows += [{"seed": seed, **json.loads(line)} for line in lines if line.strip()]
        return rows

    def _series_rows(self) -> list[dict[str, Any]]:
        rows = []
        for seed, folder in self.folders.items():
            path = folder / SERIES
            if not path.exists():
                continue
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    values = {k: finite_number(v) for k, v in row.items() if k not in ("epoch", "layer")}
                    rows.append({"seed": seed, "epoch": int(row["epoch"]), "layer": row["layer"], **values})
        return rows

    def _statistics(self) -> list[str]:
        names: list[str] = []
        for folder in self.folders.values():
            for name in _read_json(folder / "run.json")["config"].get("statistics", []):
                names += [] if name in names else [name]
            for path in sorted((folder / "stats").glob("epoch-*.json"))[-1:]:  # analyse-run adds statistics
                names += [n for n in _read_json(path).get("statistics", []) if n not in names]
        return names

    def _results(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        for seed, folder in self.folders.items():
            for path in sorted((folder / "stats").glob("epoch-*.json")):
                number = path.stem[len("epoch-"):]
                if number.isdigit():
                    yield seed, int(number), _read_json(path)


def structure_from_record(record: dict[str, Any]):
    """A ConvGraph of graph.json's layers, ready for :func:`hpa.rebind` (placeholder weights, no memory)."""
    from hpa.graph import ConvGraph, Layer, Skipped

    layers = [Layer.from_attributes(entry) for entry in record["layers"]]
    skipped = [Skipped(s["name"], s["reason"], s.get("statistic")) for s in record.get("skipped", [])]
    shape = tuple(record.get("input_shape") or ()) or None
    return ConvGraph(layers, source={"spec": record.get("spec")}, skipped=skipped, input_shape=shape)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} is missing; the run folder is incomplete (was it written by 'hpa train'?)") from None
    except ValueError as exc:
        raise LoadError(f"{path} is not valid JSON ({exc}); the run folder is damaged") from None


def _pandas():
    try:
        import pandas
    except ImportError:
        raise HpaError("Run.metrics and Run.series need pandas; pip install pandas") from None
    return pandas
