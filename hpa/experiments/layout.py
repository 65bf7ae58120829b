"""The run folder's names: every file and folder of an ``hpa train`` run, defined once.

::

    run.json                         task, architecture, recipe, seed, dataset files, versions, status
    graph.json                       the traced structure (layers with their ``params`` map), once
    snapshots/epoch-000.safetensors  the weights after each epoch; epoch 0 is the true initialisation
    metrics.jsonl                    one line per epoch: lr, losses, accuracies, seconds, snapshot + sha256
    stats/epoch-000.json             the scan result of each snapshot against epoch 0
    stats/finished.jsonl             one line per snapshot whose statistics are written: epoch, time
    series.csv                       one row per (epoch, layer): every scalar value of every statistic
    state/last.pt                    model + optimizer after the last complete epoch, for --resume
    figures/                         drawn from the above, redrawn at will

A ``--seeds`` folder holds ``seeds.json``, one run per seed in ``seed-N/``,
``summary.csv``, ``summary.json`` and ``figures/``.  Torch-free at import.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hpa.result import layer_rows

RUN_JSON = "run.json"
RUN_FORMAT = 1  # run.json's "format"
GRAPH_JSON = "graph.json"
METRICS = "metrics.jsonl"
STATE = "state/last.pt"
SNAPSHOTS = "snapshots"
STATS = "stats"
FINISHED = "stats/finished.jsonl"
SERIES = "series.csv"
FIGURES = "figures"
SEEDS_JSON = "seeds.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
RESERVED = ("epoch", "snapshot", "snapshot_sha256")  # metrics.jsonl keys hpa writes itself
TRACKER = "hpa.Tracker"  # run.json's "writer" of a run recorded from the caller's own loop (hpa train's has none)


def snapshot_name(epoch: int) -> str:
    return f"{SNAPSHOTS}/epoch-{epoch:03d}.safetensors"


def stats_name(epoch: int) -> str:
    return f"{STATS}/epoch-{epoch:03d}.json"


SEED_PREFIX = "seed-"  # a --seeds folder's runs: seed-0/, seed-1/, ...


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"{SEED_PREFIX}{seed}"


def is_seed_folder(path: Path) -> bool:
    """True for a ``seed-N`` folder's name (whether or not its parent is a --seeds folder)."""
    return Path(path).name.startswith(SEED_PREFIX)


def epoch_of(name: str, suffix: str) -> int | None:
    """The NNN of ``epoch-NNN<suffix>``, or None for any other name."""
    number = name[len("epoch-"):-len(suffix)] if name.startswith("epoch-") and name.endswith(suffix) else ""
    return int(number) if number.isdigit() else None


def snapshot_files(folder: Path) -> dict[int, Path]:
    """epoch -> snapshot file actually on disk (the run's record of them is metrics.jsonl)."""
    found = {}
    for path in (Path(folder) / SNAPSHOTS).glob("epoch-*.safetensors"):
        epoch = epoch_of(path.name, ".safetensors")
        if epoch is not None:
            found[epoch] = path
    return dict(sorted(found.items()))


def seed_folders(out: Path) -> dict[int, Path]:
    """seed -> ``seed-N`` folder holding a run.json, of a ``--seeds`` folder."""
    found = {}
    for path in Path(out).glob(f"{SEED_PREFIX}*"):
        number = path.name[len(SEED_PREFIX):]
        if number.lstrip("-").isdigit() and (path / RUN_JSON).is_file():
            found[int(number)] = path
    return dict(sorted(found.items()))


def finite_number(value: Any) -> float | None:
    """A series.csv (or metrics) cell as a finite float; None for blanks, text, NaN and infinities."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def series_rows_of(epoch: int, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The series.csv rows of one epoch's scan result (its ``to_dict()``, as stats/ holds it).

    A row holds the statistics' values only (``NAME.value``, as ``layer_rows`` names them); the
    layers' structure is in graph.json.
    """
    return [{"epoch": epoch, "layer": row["name"], **{k: v for k, v in row.items() if "." in k}}
            for row in layer_rows(result)]
