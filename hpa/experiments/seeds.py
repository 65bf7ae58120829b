"""``hpa train --seeds 0,1,2``: one run per seed in ``OUT/seed-N/``, then a mean ± std summary.

``OUT/seeds.json`` lists the seeds, so ``--resume OUT`` continues every run
that is unfinished and starts the ones never started, with the recorded
configuration.  ``summary.csv`` has one row per (epoch, layer) with the mean
and standard deviation over seeds of every numeric ``series.csv`` column;
``summary.json`` holds the same for ``metrics.jsonl`` per epoch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from hpa.errors import HpaError, OptionError
from hpa.experiments.run import METRICS
from hpa.experiments.stats import SERIES, _csv, finite_number
from hpa.files import atomic_write_text

SEEDS_JSON = "seeds.json"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"--seeds takes comma-separated integers such as 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds needs distinct integers such as 0,1,2, not {text!r}")
    return seeds


def is_multi_seed(folder: str | Path) -> bool:
    return (Path(folder) / SEEDS_JSON).is_file()


def train_seeds(seeds: list[int], out: str | Path, **options: Any) -> Path:
    """Train one run per seed into ``out/seed-N`` and write the summary; returns ``out``."""
    from hpa.experiments.train import train

    options = {k: v for k, v in options.items() if k not in ("seed", "resume")}
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HpaError(f"the run folder {out} already exists; continue it with --resume {out}, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SEEDS_JSON, json.dumps({"seeds": seeds}) + "\n")
    for seed in seeds:
        train(out=out / f"seed-{seed}", seed=seed, **options)
    write_summary(out, seeds)
    return out


def resume_seeds(folder: str | Path, **given: Any) -> Path:
    """Continue every seed's run in ``folder`` (starting those never started), then rewrite the summary."""
    from hpa.experiments.train import train

    given = {k: v for k, v in given.items() if k not in ("out", "resume")}
    out = Path(folder).expanduser()
    seeds = json.loads((out / SEEDS_JSON).read_text())["seeds"]
    started = [s for s in seeds if (out / f"seed-{s}" / "run.json").is_file()]
    for seed in seeds:
        run = out / f"seed-{seed}"
        if seed in started:
            train(resume=run, **given)
        elif started:
            train(out=run, seed=seed, **{**_recorded_options(out / f"seed-{started[0]}"), **_given(given)})
        else:
            raise HpaError(f"no run in {out} has started; delete {out} and start again with --seeds")
    write_summary(out, seeds)
    return out


def _recorded_options(folder: Path) -> dict[str, Any]:
    record = json.loads((folder / "run.json").read_text())
    config = record["config"]
    return {"task": config["task"], "arch": config["arch"], "device": config["device"],
            "snapshot_every": config["snapshot_every"], "statistics": config.get("statistics", ()),
            "data": record.get("data_dir"), "recipe_name": config.get("recipe_name"),
            "precision": config.get("precision"), "compiled": config.get("compiled"),
            "cpu_threads": config.get("cpu_threads"), **config.get("noise", {}),
            **config["recipe"]}


def _given(given: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None and k not in ("seed", "resume", "out")}


def write_summary(out: Path, seeds: list[int]) -> None:
    rows = {seed: _read_series(out / f"seed-{seed}" / SERIES) for seed in seeds}
    atomic_write_text(out / "summary.csv", _csv(_mean_std(rows, ("epoch", "layer"))))
    metrics = {seed: _read_metrics(out / f"seed-{seed}" / METRICS) for seed in seeds}
    summary = {"seeds": seeds, "metrics": _mean_std(metrics, ("epoch",))}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _write_figures(out)


def _write_figures(out: Path) -> None:
    """OUT/figures/: each curve's mean over the seeds with a ±1 std band (Gamba et al. 2020 Fig. 7)."""
    from hpa.experiments.open_run import open_run

    open_run(out).plot()


def _mean_std(per_seed: dict[int, list[dict[str, Any]]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows keyed by ``keys``; every other numeric column as ``NAME.mean`` and ``NAME.std`` over seeds."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for rows in per_seed.values():
        for row in rows:
            grouped.setdefault(tuple(str(row[k]) for k in keys), []).append(row)
    out = []
    for key, rows in grouped.items():
        summary: dict[str, Any] = dict(zip(keys, key))
        summary["n_seeds"] = len(rows)
        for column in [c for c in rows[0] if c not in keys]:
            values = [finite_number(row.get(column)) for row in rows]
            if all(v is not None for v in values):
                summary[f"{column}.mean"] = float(np.mean(values))
                summary[f"{column}.std"] = float(np.std(values))
        out.append(summary)
    return sorted(out, key=lambda r: (int(r["epoch"]), *[str(r[k]) for k in keys[1:]]))


def _read_series(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "snapshot"} for line in path.read_text().splitlines()]
