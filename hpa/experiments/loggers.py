"""A run folder's values, also in the dashboards people already look at: TensorBoard, W&B, MLflow.

Each epoch is published once its line is in metrics.jsonl and, for a snapshot, once
``stats/finished.jsonl`` says its statistics are written; the values are read back
from the run folder (so a dashboard shows exactly what series.csv holds):

- every number of the metrics line (``train_loss``, ``val_accuracy``, ``lr``, ``seconds`` ...), under its own name;
- every per-layer scalar of every statistic, as series.csv holds it, under
  ``hpa/<statistic>/<layer>/<value>`` (``hpa/projection/features.0/n_l``, ``.../distance_from_init.relative_l2``);
- the cosine of each filter (projection), as a histogram ``hpa/projection/<layer>/cosines``
  (TensorBoard and W&B; MLflow has no histograms).

The step is the epoch.  A dashboard that fails (a full disk, a server that is down)
never stops training: one warning line, and it is left out from then on; the run
folder keeps the truth.  Each client is its project's own: ``torch.utils.tensorboard``,
``wandb``, ``mlflow``, optional extras.  An active ``wandb.run`` or MLflow run is
logged into (and left open); otherwise one is started: TensorBoard in ``RUN/tensorboard``,
W&B in ``RUN/wandb`` (project ``WANDB_PROJECT`` or "hpa"; ``WANDB_MODE=offline`` works),
MLflow at ``MLFLOW_TRACKING_URI`` or the file store ``RUN/mlruns`` (experiment "hpa"; MLflow 3 opens
a file store only with ``MLFLOW_ALLOW_FILE_STORE``, which is then set to true unless already set:
its SQLite store takes some ten seconds to create, the file store under two).
"""

from __future__ import annotations

import importlib
import numbers
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from hpa.errors import HpaError, HpaWarning, OptionError
from hpa.experiments.layout import finite_number
from hpa.experiments.open_run import RunFolder

__all__ = ["LOGGERS", "Loggers", "epoch_values"]

#: name -> (package imported, extra that installs it)
LOGGERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
           "mlflow": ("mlflow", "mlflow")}
_NOT_LOGGED = ("epoch", "snapshot", "snapshot_sha256", "tracked")  # metrics.jsonl keys that are no measurement


class Loggers:
    """The dashboards named in ``names``; :meth:`publish` after each epoch's writes, :meth:`close` at the end."""

    def __init__(self, names: Iterable[str]) -> None:
        if isinstance(names, str):
            names = (names,)
        self.names = tuple(dict.fromkeys(names))
        for name in self.names:
            _require(name)
        self._backends: dict[str, Any] | None = None
        self._next = 0  # the first epoch not yet published

    def __bool__(self) -> bool:
        return bool(self.names)

    def publish(self, folder: Path) -> None:
        """Send every epoch of ``folder`` whose values are all written and that was not sent yet."""
        if not self.names:
            return
        reader = RunFolder(folder)
        lines = reader.metrics()
        waits_for_statistics = bool(reader.record()["config"].get("statistics"))
        finished = reader.finished_epochs(lenient=True)
        for line in lines[self._next:]:
            if line.get("snapshot") and waits_for_statistics and line["epoch"] not in finished:
                break
            scalars, histograms = epoch_values(reader, line)
            self._send(Path(folder), line["epoch"], scalars, histograms)
            self._next = line["epoch"] + 1

    def close(self) -> None:
        for name, backend in (self._backends or {}).items():
            self._guarded(name, backend.close)
        self._backends = {}

    def _send(self, folder: Path, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        if self._backends is None:
            self._backends = {}
            for name in self.names:
                backend = self._guarded(name, lambda name=name: _BACKENDS[name](folder))
                if backend is not None:
                    self._backends[name] = backend
        for name, backend in list(self._backends.items()):
            self._guarded(name, lambda: backend.log(step, scalars, histograms))

    def _guarded(self, name: str, call):
        """``call()``; a failure is one warning and the dashboard is left out from then on."""
        try:
            return call()
        except Exception as exc:  # a dashboard's own error types: any of them must not stop training
            if self._backends is not None:
                self._backends.pop(name, None)
            reason = (str(exc).splitlines() or [""])[0][:200]
            warnings.warn(f"the {name} logger failed ({type(exc).__name__}: {reason}); hpa stops logging to it, "
                          "and the run folder keeps every value", _hpa_warning(), stacklevel=2)
            return None


def epoch_values(reader, line: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scalars, histograms) of one epoch of a run folder (an ``open_run.RunFolder``), as they are logged."""
    scalars = {key: float(value) for key, value in line.items() if key not in _NOT_LOGGED
               and isinstance(value, numbers.Real) and not isinstance(value, bool)
               and finite_number(value) is not None}
    histograms: dict[str, list[float]] = {}
    if not line.get("snapshot"):
        return scalars, histograms
    epoch = line["epoch"]
    for row in reader.series_file_rows():
        if int(row["epoch"]) != epoch:
            continue
        for column, cell in row.items():
            value = finite_number(cell) if "." in column else None
            if value is not None:
                statistic, name = column.split(".", 1)
                scalars[f"hpa/{statistic}/{row['layer']}/{name}"] = value
    result = reader.stats(epoch) or {"layers": []}
    for entry in result["layers"]:
        cosines = (entry["statistics"].get("projection") or {}).get("cosines")
        live = [c for c in cosines or () if c is not None]
        if live:
            histograms[f"hpa/projection/{entry['name']}/cosines"] = live
    return scalars, histograms


# -- the clients ---------------------------------------------------------------------------------------

def _require(name: str):
    if name not in LOGGERS:
        raise OptionError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    package, extra = LOGGERS[name]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise HpaError(f"logging to {name} needs the {extra} package: pip install 'hpa[{extra}]'") from None


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        self.writer = _require("tensorboard").SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        import numpy as np

        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path) -> None:
        import os

        self.wandb = _require("wandb")
        self.own = self.wandb.run is None  # the caller's active run is logged into and left open
        # console="off": a run hpa starts leaves the caller's stdout and stderr alone
        self.run = self.wandb.run or self.wandb.init(project=os.environ.get("WANDB_PROJECT", "hpa"),
                                                      name=folder.name, dir=str(folder),
                                                      config={"hpa_run": str(folder)},
                                                      settings=self.wandb.Settings(console="off"))

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        values: dict[str, Any] = dict(scalars)
        values.update({tag: self.wandb.Histogram(data) for tag, data in histograms.items()})
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.own:
            self.run.finish()


class _MLflow:
    def __init__(self, folder: Path) -> None:
        import os

        mlflow = _require("mlflow")
        active = mlflow.active_run()
        if active or os.environ.get("MLFLOW_TRACKING_URI"):
            uri = mlflow.get_tracking_uri()
        else:  # the run's own file store, which MLflow 3 opens only when allowed (a user's "false" is kept)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (folder / "mlruns").resolve().as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        self.own = active is None
        if active is not None:
            self.run_id = active.info.run_id
        else:
            found = self.client.get_experiment_by_name("hpa")
            experiment = found.experiment_id if found else self.client.create_experiment("hpa")
            self.run_id = self.client.create_run(experiment, run_name=folder.name,
                                                 tags={"hpa_run": str(folder)}).info.run_id

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        if self.own:
            self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _hpa_warning():
    return HpaWarning
