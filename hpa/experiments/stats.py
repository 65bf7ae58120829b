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
from pathlib import Path
from typing import Any

from hpa.errors import LoadError
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
        self.rows = [row for row in self.rows if int(row["epoch"]) < epoch]
        for row in result.layer_rows():
            values = {k: v for k, v in row.items() if k not in _STRUCTURE}
            self.rows.append({"epoch": epoch, "layer": row["name"], **values})
        atomic_write_text(self.folder / SERIES, _csv(self.rows))

    def _graph(self, snapshot: Path):
        """The snapshot as a ConvGraph: rebound to the traced structure (numpy only) when possible."""
        from safetensors.numpy import load_file

        from hpa.rebind import rebind

        state = load_file(str(snapshot))
        try:
            return rebind(self.structure, state)
        except LoadError:  # a layer computes its weight in the forward pass: trace that state instead
            return _retrace(self.model, state, self.structure.input_shape)


def _retrace(model, state, input_size):
    import torch

    import hpa

    probe = copy.deepcopy(model).cpu()
    probe.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return hpa.load(probe, input_size=input_size)


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
